"""`python -m infer --chat` on a terminal (a pseudo-terminal here): turns keep the conversation, the second reuses
the first's cached tokens (the prefix cache's full blocks of 16), /reset starts over, Ctrl-C stops an answer and not
the program, Ctrl-D leaves."""

import os
import pty
import select
import sys
import time

import pytest

from infer.__main__ import main as infer_main

pytestmark = pytest.mark.slow  # SmolLM2 through a pseudo-terminal: about 30 s


class Terminal:
    """A program on a pseudo-terminal: type lines, read what it prints."""

    def __init__(self, argv):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.execv(sys.executable, [sys.executable, *argv])
        self.out, self.seen = b"", 0

    def read_until(self, marker: bytes, timeout: float = 240) -> str:
        """Everything printed after the last marker read, up to this one."""
        end = time.time() + timeout
        while marker not in self.out[self.seen:]:
            if time.time() > end:
                pytest.fail(f"no {marker!r} in {self.out.decode(errors='replace')!r}")
            if select.select([self.fd], [], [], 0.2)[0]:
                self.out += os.read(self.fd, 4096)
        start, self.seen = self.seen, self.out.index(marker, self.seen) + len(marker)
        return self.out[start:self.seen].decode(errors="replace")

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the child execs at once: no thread is needed there
def test_a_conversation_on_a_terminal(smollm2_checkpoint):
    """Time (~30 s): the real chat program on a pseudo-terminal, compiling its programs and answering two turns of
    the real model (up to 300 tokens each), as a user would see it."""
    term = Terminal(["-m", "infer", str(smollm2_checkpoint), "--chat", "--temperature", "0", "--max-new-tokens",
                     "300"])
    term.read_until(b"> ")
    term.type("What is the capital of France?\n")
    first = term.read_until(b"generated)")
    assert "Paris" in first and "(0 tokens reused" in first
    term.read_until(b"> ")
    term.type("And of Germany?\n")
    second = term.read_until(b"generated)")
    assert "Berlin" in second
    prefilled, generated = (int(first.split("(")[-1].split(", ")[i].split()[0]) for i in (1, 2))
    reused = int(second.split("(")[-1].split()[0])
    # the first turn's tokens (all but its last, never fed back) in full blocks were not prefilled again
    assert reused >= (prefilled + generated - 1) // 16 * 16 > 0
    term.read_until(b"> ")
    term.type("/reset\n")
    term.read_until(b"cleared")
    term.type("Write a very long story about a dragon who learns to read.\n")
    term.read_until(b"read.\r\n")  # the terminal's echo of the line
    time.sleep(1.0)  # the answer is being written (its programs were compiled by the first turns)
    term.type("\x03")  # Ctrl-C: stops the answer, not the program
    stopped = term.read_until(b"generated)")
    assert "stopped after" in stopped and "tokens reused" in stopped
    term.read_until(b"> ")
    term.type("\x04")  # Ctrl-D leaves
    assert os.waitpid(term.pid, 0)[1] == 0


def test_chat_without_a_prompt_needs_a_terminal(smollm2_checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer_main([str(smollm2_checkpoint), "--chat"])
    assert exit_info.value.code == 2 and "on a terminal" in capsys.readouterr().err
