"""
Tests for the gRPC contract: the committed generated code matches
C{protos/chat.proto}, and the older design's wire format still holds.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from easybackend.proto import chat_pb2, generate


class GeneratedCodeTests(SynchronousTestCase):

    def test_up_to_date(self):
        """
        protoc's output for protos/chat.proto is what easybackend/proto/
        holds; when this fails, run C{python -m easybackend.proto.generate}
        and commit the result.
        """
        out = Path(self.mktemp())
        written = generate.generate(out)
        self.assertEqual(sorted(p.name for p in written),
                         sorted(generate.generated_names()))
        for path in written:
            committed = generate.PACKAGE_DIR / path.name
            self.assertTrue(committed.exists(), f"{committed} is missing")
            self.assertEqual(
                committed.read_text(), path.read_text(),
                f"{committed.name} is out of date with protos/chat.proto: "
                f"run python -m easybackend.proto.generate",
            )
        self.assertEqual(generate.out_of_date(), [])

    def test_check_command(self):
        """C{--check} says when the generated code is stale."""
        output = io.StringIO()
        self.patch(sys, "stdout", output)
        out = Path(self.mktemp())
        generate.generate(out)
        self.assertEqual(generate.main(["--check", "--out", str(out)]), 0)
        stale = out / "chat_pb2.py"
        stale.write_text(stale.read_text() + "# edited\n")
        self.assertEqual(generate.main(["--check", "--out", str(out)]), 1)
        self.assertIn("out of date with protos/: chat_pb2.py", output.getvalue())

    def test_imports_from_the_package(self):
        """The generated gRPC module imports its messages from the package."""
        source = (generate.PACKAGE_DIR / "chat_pb2_grpc.py").read_text()
        self.assertIn("from easybackend.proto import chat_pb2", source)
        self.assertNotIn("\nimport chat_pb2", source)


class WireCompatibilityTests(SynchronousTestCase):
    """The older design's clients keep working: names and numbers hold."""

    def fields(self, message):
        return {f.name: (f.number, f.type) for f in message.DESCRIPTOR.fields}

    def test_names(self):
        service = chat_pb2.DESCRIPTOR.services_by_name["Chat"]
        self.assertEqual(service.full_name, "chat.Chat")
        ask = service.methods_by_name["Ask"]
        self.assertTrue(ask.server_streaming)
        self.assertFalse(ask.client_streaming)
        self.assertEqual(ask.input_type.full_name, "chat.AskRequest")
        self.assertEqual(ask.output_type.full_name, "chat.AskResponse")

    def test_old_fields(self):
        string = chat_pb2.AskRequest.DESCRIPTOR.fields[0].TYPE_STRING
        request = self.fields(chat_pb2.AskRequest)
        self.assertEqual(request["prompt"], (1, string))
        self.assertEqual(request["conversation_id"], (2, string))
        self.assertEqual(request["parent_id"], (3, string))
        self.assertEqual(self.fields(chat_pb2.AskResponse)["response"], (1, string))

    def test_optional_presence(self):
        request = chat_pb2.AskRequest(prompt="x")
        self.assertFalse(request.HasField("temperature"))
        self.assertFalse(request.HasField("max_tokens"))
        request.temperature = 0.0
        self.assertTrue(request.HasField("temperature"))
