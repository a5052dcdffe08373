"""
Packaging and the container: what a fresh install and the Dockerfile must
give, checked without a Docker engine (none runs on these machines).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuations joined."""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


class DockerfileTests(SynchronousTestCase):
    """The Dockerfile has what the deployment section promises."""

    def test_instructions(self) -> None:
        """
        When the image is built, then it starts from a slim Python, installs
        the package with pip, fetches the tiktoken encodings into
        TIKTOKEN_CACHE_DIR, runs as a non-root user, keeps conversations in
        a volume, exposes the three ports, checks /healthz, and runs twistd.
        """
        instructions = dockerfile()
        by = {}
        for word, rest in instructions:
            by.setdefault(word, []).append(rest)
        self.assertRegex(by["FROM"][0], r"^python:3\.1[1-9][.\d]*-slim")
        run = " ".join(by["RUN"])
        self.assertIn("pip install --no-cache-dir .", run)
        self.assertIn("tiktoken.get_encoding", run)
        self.assertIn("TIKTOKEN_CACHE_DIR=/opt/tiktoken", " ".join(by["ENV"]))
        user = by["USER"][-1]
        self.assertNotIn(user, ("root", "0"))
        self.assertIn(f"useradd", run)
        self.assertEqual(by["VOLUME"], ["/app/conversations"])
        self.assertEqual(sorted(by["EXPOSE"][0].split()), ["8000", "9000", "9001"])
        self.assertIn("/healthz", by["HEALTHCHECK"][0])
        self.assertEqual(by["CMD"], ['["twistd", "-n", "--pidfile=", "easybackend"]'])
        # USER comes after the install, so that pip runs as root.
        words = [w for w, _ in instructions]
        self.assertGreater(words.index("USER"), max(i for i, w in enumerate(words) if w == "RUN"))

    def test_dockerignore(self) -> None:
        """When the build context is sent, then the venv, git and data stay out."""
        with open(os.path.join(ROOT, ".dockerignore")) as f:
            ignored = f.read().split()
        for entry in [".git", ".venv", "conversations/*"]:
            self.assertIn(entry, ignored)

    def test_copied_paths_exist(self) -> None:
        """When the Dockerfile copies a path, then it exists in the repository."""
        for word, rest in dockerfile():
            if word == "COPY":
                for source in shlex.split(rest)[:-1]:
                    self.assertTrue(os.path.exists(os.path.join(ROOT, source)), source)


class InstallTests(TestCase):
    """The image's install command, run outside Docker."""

    timeout = 300

    async def test_pip_install_registers_plugin(self) -> None:
        """
        When the package is installed with a plain (non-editable)
        C{pip install .}, then Twisted's plugin scan finds C{easybackend}
        from the installed copy, not from the source tree.
        """
        target = os.path.abspath(self.mktemp())

        def install_and_scan() -> subprocess.CompletedProcess[str]:
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                 "--target", target, ROOT],
                check=True, capture_output=True, text=True, cwd=ROOT)
            scan = ("import sys; from twisted.plugin import getPlugins; "
                    "from twisted.application.service import IServiceMaker; "
                    "import easybackend; print(easybackend.__file__); "
                    "print([p.tapname for p in getPlugins(IServiceMaker)])")
            env = dict(os.environ, PYTHONPATH=target)
            return subprocess.run([sys.executable, "-c", scan], capture_output=True,
                                  text=True, cwd=target, env=env)

        result = await deferToThread(install_and_scan)
        self.assertEqual(result.returncode, 0, result.stderr)
        where, names = result.stdout.splitlines()[-2:]
        self.assertTrue(where.startswith(target), where)
        self.assertIn("'easybackend'", names)
