"""
The gRPC contract's generated code.

C{chat_pb2}, C{chat_pb2_grpc} (and the C{.pyi} stubs) are generated from
C{protos/chat.proto} by C{python -m easybackend.proto.generate}; do not edit
them by hand.  C{tests/test_proto.py} fails when they are out of date.
"""
