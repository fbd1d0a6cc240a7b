"""examples/wordcount: the pipeline's counts equal a single-process count."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import ROOT, Workspace

VOCABULARY = [
    "the",
    "The",
    "THE",
    "ZeroMQ",
    "pipe_line",
    "café",
    "CAFÉ",
    "straße",
    "İstanbul",
    "naïve",
    "x2",
    "42",
    "日本語",
    "ΣΊΣΥΦΟΣ",
    "don't",
    "co-op",
    "a",
] + [f"w{i}" for i in range(3000)]
SEPARATORS = [" ", " ", " ", ", ", ". ", "\t", " -- ", "!? ", "\u00a0"]
LINE_ENDS = ["\n"] * 8 + ["\r\n", "\r"]


def write_text(path: Path, size: int, seed: int = 7) -> None:
    """``size`` bytes of varied text: mixed case, Unicode, odd line ends, bad bytes."""
    rng = random.Random(seed)
    chunks: list[bytes] = []
    written = 0
    while written < size:
        words = (
            rng.choice(VOCABULARY) + rng.choice(SEPARATORS)
            for _ in range(rng.randint(0, 20))
        )
        data = ("".join(words) + rng.choice(LINE_ENDS)).encode()
        if rng.random() < 0.001:
            data = b"\xff\xfe not utf-8 \xc3" + data
        chunks.append(data)
        written += len(data)
    path.write_bytes(b"".join(chunks))


def reference_count(path: Path) -> dict[str, int]:
    counts: Counter[str] = Counter()
    with open(path, encoding="utf-8", errors="replace") as text:
        for line in text:
            counts.update(re.findall(r"\w+", line.lower()))
    return dict(counts)


def private_endpoints(ws: Workspace) -> list[str]:
    lines, words = ws.endpoint("lines"), ws.endpoint("words")
    overrides = {
        "stages.lines.push.bind": lines,
        "stages.words.pull.connect": lines,
        "stages.words.push.connect": words,
        "stages.tally.pull.bind": words,
    }
    return [
        arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")
    ]


def run_wordcount(
    ws: Workspace, text: Path, output: Path, timeout: float = 120, code: int = 0
) -> dict[str, object]:
    exit_code, report = ws.run_json(
        str(ROOT / "examples" / "wordcount.toml"),
        "--set",
        f"stages.lines.params.path={text}",
        "--set",
        f"stages.tally.params.output={output}",
        *private_endpoints(ws),
        timeout=timeout,
    )
    assert exit_code == code, report
    return report


def test_wordcount_matches_a_single_process_count_on_megabytes(ws: Workspace) -> None:
    text, output = ws.path / "big.txt", ws.path / "counts.json"
    write_text(text, 5 * 2**20)

    report = run_wordcount(ws, text, output)

    expected = reference_count(text)
    assert json.loads(output.read_text(encoding="utf-8")) == expected
    assert report["summary"] == {
        "output": str(output),
        "words": sum(expected.values()),
        "distinct": len(expected),
    }
    assert report["lost"] == 0


@pytest.mark.parametrize(
    "content",
    [
        b"",
        "\n\r\nÜnïcödé ÜNÏCÖDÉ\r\nİi ß SS ǅ\u2028next 3.14 foo_bar\rno end".encode(),
    ],
)
def test_wordcount_handles_small_and_odd_files(ws: Workspace, content: bytes) -> None:
    text, output = ws.path / "odd.txt", ws.path / "out.json"
    text.write_bytes(content)

    run_wordcount(ws, text, output)

    assert json.loads(output.read_text(encoding="utf-8")) == reference_count(text)


def test_wordcount_reads_standard_input_when_path_is_a_dash(ws: Workspace) -> None:
    text, output = ws.path / "in.txt", ws.path / "out.json"
    write_text(text, 200_000, seed=3)
    command = [sys.executable, "-m", "orchestrator", "run", "--json"]
    command += [str(ROOT / "examples" / "wordcount.toml")]
    command += private_endpoints(ws)
    command += ["--set", "stages.lines.params.path=-"]
    command += ["--set", f"stages.tally.params.output={output}"]

    with open(text, "rb") as stdin:
        result = subprocess.run(
            command,
            cwd=ws.path,
            env=ws.env,
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert result.returncode == 0, result.stderr
    assert json.loads(output.read_text(encoding="utf-8")) == reference_count(text)


def test_a_failed_run_leaves_an_earlier_output_file_alone(ws: Workspace) -> None:
    output = ws.path / "out.json"
    output.write_text('{"kept": 1}', encoding="utf-8")

    report = run_wordcount(ws, ws.path / "no-such-file.txt", output, code=1)

    assert report["status"] == "failed"
    assert "No such file" in report["failure"]
    assert output.read_text(encoding="utf-8") == '{"kept": 1}'
    assert report["summary"] is None
