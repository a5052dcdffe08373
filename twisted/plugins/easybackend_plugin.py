# No __init__.py beside this file: Twisted's plugin discovery needs it so.
from twisted.application.service import ServiceMaker

easybackend = ServiceMaker(
    "EasyBackend",
    "easybackend.tap",
    "A self-hosted ChatGPT backend: conversation memory over HTTP, "
    "WebSocket and gRPC.",
    "easybackend",
)
