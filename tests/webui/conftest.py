"""The webui tier: a real Forge webui started on CPU on 127.0.0.1, with a tiny random FLUX and tiny LoRAs.

One server per test session (`webui` fixture):
1. a temporary data dir (Forge's --data-dir: it looks up models/ and extensions/ there and writes its settings,
   cache/ and params.txt there; Forge's own tree is left untouched);
2. tiny_models.py, run by Forge's Python, writes models/Stable-diffusion/tiny_flux.safetensors, models/Lora/
   tiny_lora_a|b.safetensors and the tiny pipeline configs; tiny_sdxl.py the same for a tiny SDXL (tiny_sdxl,
   tiny_sdxl_a|b); on Neo tiny_klein.py the same for a tiny FLUX.2 Klein (tiny_klein, tiny_klein_a|b) and
   tiny_qwen_image.py for a tiny Qwen-Image (tiny_qwen_image, tiny_qwen_image_a|b); tiny_zimage.py for a tiny
   Z-Image (tiny_zimage, tiny_zimage_a|b);
   tiny_chroma.py for a tiny Chroma (tiny_chroma, tiny_chroma_a|b);
3. this repository is linked in as extensions/sd-forge-freefuse, and webui_extension/ (a test-only script that
   gives each image of a batch its own prompt, as the Dynamic Prompts extension does) beside it;
4. `launch.py` starts under Forge's Python (FORGE_PYTHON, else <forge>/venv/bin/python) with webui_hook/ on
   PYTHONPATH (its sitecustomize.py lets Forge's loader take the tiny FLUX), bound to 127.0.0.1 on a free port;
5. the fixture waits until the API answers and Forge has finished starting, yields a `WebUI` client (base URL,
   txt2img helper, PNG decoding, the server's log), and at the end ends the server's whole process group.
   Startup and request times are printed in pytest's terminal summary.

The test process itself needs only the standard library (urllib, zlib) and pytest.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from forge_locator import REPO_ROOT, find_forge, is_neo

from lib_freefuse.args import PAPER_SETTINGS

HERE = Path(__file__).resolve().parent
HOOK_DIR = HERE / "webui_hook"
TOY_WORLD = REPO_ROOT / "bench" / "toyworld" / "model"
TOY_WORLD_FILES = (
    (TOY_WORLD / "toyworld_flux.safetensors", "Stable-diffusion"),
    (TOY_WORLD / "toy_zorb.safetensors", "Lora"),
    (TOY_WORLD / "toy_quil.safetensors", "Lora"),
)
PAPER = PAPER_SETTINGS  # the paper's rules where the extension's defaults go beyond it
EXTENSION_NAME = "sd-forge-freefuse"
TEST_EXTENSION_NAME = "freefuse-test-per-image-prompts"  # webui_extension/: a prompt per image of a batch

STARTUP_TIMEOUT_S = float(os.environ.get("FREEFUSE_WEBUI_STARTUP_TIMEOUT", "300"))
REQUEST_TIMEOUT_S = 600.0

# What launch.py needs beyond Forge's backend; pkg_resources (setuptools < 81) is imported by pytorch_lightning.
WEBUI_MODULES = ("torch", "torchvision", "gradio", "fastapi", "transformers", "diffusers", "pkg_resources", "joblib")

COMMON_FLAGS = (
    "--skip-torch-cuda-test",
    "--skip-install",  # no extension installers, no pip
    "--skip-prepare-environment",  # no git clones, no requirement checks
    "--skip-version-check",
    "--api",
)
CLASSIC_FLAGS = (
    "--always-cpu",  # Forge's backend on the CPU (else it asserts on CUDA)
    "--attention-pytorch",  # SDPA, as the forge tier uses
    "--no-download-sd-model",
)
NEO_FLAGS = (
    "--cpu",  # Neo's name for classic's --always-cpu
    "--use-pytorch-cross-attention",
    "--skip-python-version-check",  # Neo asks for Python 3.13 and runs on 3.11
)


def server_flags(forge_root: Path) -> tuple[str, ...]:
    """The flags that start this host's webui headless on the CPU, without network or installs."""
    return COMMON_FLAGS + (NEO_FLAGS if is_neo(forge_root) else CLASSIC_FLAGS)


TIMINGS: dict[str, object] = {}  # for the terminal summary
_NEO_RECORD_TAIL = re.compile(r" +\S+\.py :: (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) *$")  # Neo's log column


def find_forge_python(forge_root: Path) -> tuple[str | None, str]:
    """(Python that can run Forge's webui, "") or (None, one-line reason)."""
    configured = os.environ.get("FORGE_PYTHON")
    if configured:
        python, origin = Path(configured).expanduser(), f"FORGE_PYTHON={configured}"
    else:
        python, origin = forge_root / "venv" / "bin" / "python", f"{forge_root}/venv/bin/python (FORGE_PYTHON unset)"
    if not python.is_file():
        return None, f"no Python for Forge's webui: {origin} does not exist"
    probe = "import sys; from importlib.util import find_spec as f; print(*(m for m in sys.argv[1:] if not f(m)))"
    try:
        result = subprocess.run(
            [str(python), "-c", probe, *WEBUI_MODULES], capture_output=True, text=True, timeout=120, check=True
        )
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"{origin} does not run: {error}"
    missing = result.stdout.split()
    if missing:
        return None, f"{origin} lacks what Forge's webui needs: {', '.join(missing)}"
    return str(python), ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------- PNG


@dataclass
class PngImage:
    """A PNG decoded with the standard library (8-bit grey/RGB/RGBA, no interlace): enough for tests."""

    width: int
    height: int
    channels: int
    pixels: bytes  # row-major, unfiltered, `channels` bytes per pixel
    text: dict[str, str] = field(default_factory=dict)  # tEXt/iTXt chunks: Forge's infotext is "parameters"

    @classmethod
    def decode(cls, data: bytes) -> PngImage:
        if data[:8] != b"\x89PNG\r\n\x1a\n":
            raise ValueError("not a PNG")
        pos, idat, text, header = 8, bytearray(), {}, None
        while pos < len(data):
            (length,) = struct.unpack(">I", data[pos : pos + 4])
            kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
            (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
            if zlib.crc32(kind + body) != crc:
                raise ValueError(f"bad CRC in {kind!r}")
            pos += 12 + length
            if kind == b"IHDR":
                header = struct.unpack(">IIBBBBB", body)
            elif kind == b"IDAT":
                idat += body
            elif kind == b"tEXt":
                key, _, value = body.partition(b"\0")
                text[key.decode("latin-1")] = value.decode("latin-1")
            elif kind == b"iTXt":
                key, _, rest = body.partition(b"\0")
                compressed, rest = rest[0], rest[2:]
                _language, _, rest = rest.partition(b"\0")
                _translated, _, value = rest.partition(b"\0")
                text[key.decode("latin-1")] = (zlib.decompress(value) if compressed else value).decode("utf-8")
            elif kind == b"IEND":
                break
        if header is None:
            raise ValueError("no IHDR")
        width, height, depth, color, _compression, _filter, interlace = header
        channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
        if depth != 8 or channels is None or interlace:
            raise ValueError(f"unsupported PNG: depth {depth}, colour type {color}, interlace {interlace}")
        return cls(width, height, channels, _unfilter(zlib.decompress(bytes(idat)), width, height, channels), text)

    def mean_and_spread(self) -> tuple[float, int]:
        """Mean byte value and (max - min) over all pixels: a constant image has spread 0."""
        return sum(self.pixels) / len(self.pixels), max(self.pixels) - min(self.pixels)


def _unfilter(raw: bytes, width: int, height: int, bpp: int) -> bytes:
    stride, out, prev = width * bpp, bytearray(), bytearray(width * bpp)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out += line
        prev = line
    return bytes(out)


# ------------------------------------------------------------------------------------------------------ client


@dataclass
class Txt2ImgResult:
    images: list[PngImage]
    info: dict  # the API's "info", parsed: "infotexts", "seed", "all_seeds", ...
    parameters: dict
    seconds: float

    @property
    def infotext(self) -> str:
        return self.info["infotexts"][0]


@dataclass
class WebUI:
    """A running Forge webui: base URL, its data dir and log, the tiny models, and HTTP helpers."""

    url: str
    data_dir: Path
    log_path: Path
    manifest: dict  # from tiny_models.py: checkpoint, checkpoint_name, loras {name: path}, transformer config; "sdxl":
    # tiny_sdxl.py's (checkpoint, checkpoint_name, configs, loras)
    startup_s: float
    pid: int = 0  # the server's process
    neo: bool = False  # the host is Forge Neo (else classic Forge)

    def rss_mib(self) -> float:
        """The server process's resident memory now, MiB (Linux /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS for the server process")

    @property
    def hires_upscaler(self) -> str:
        """An upscaler for hires-fix tests: "Latent" where the host has it (classic Forge), else the first the host
        lists (this Neo release registers no latent mode)."""
        latent = [mode["name"] for mode in self.get("/sdapi/v1/latent-upscale-modes")]
        if "Latent" in latent:
            return "Latent"
        names = latent + [u["name"] for u in self.get("/sdapi/v1/upscalers") if u["name"] != "None"]
        assert names, "the host lists no upscaler for hires fix"
        return names[0]

    def image_size(self, width: int, height: int) -> tuple[int, int]:
        """The size the host makes for a requested size: this Neo release rounds both to multiples of 64."""
        if not self.neo:
            return width, height
        return max((width + 32) // 64 * 64, 64), max((height + 32) // 64 * 64, 64)

    @property
    def checkpoint_title(self) -> str:
        """The tiny checkpoint as the host's checkpoint list titles it (what its UI's dropdown holds)."""
        return self.model_title(self.checkpoint)

    def model_title(self, name: str) -> str:
        """A checkpoint (by model name) as the host's checkpoint list titles it."""
        titles = [m["title"] for m in self.get("/sdapi/v1/sd-models") if m["model_name"] == name]
        assert titles, f"the host lists no {name}"
        return titles[0]

    @property
    def checkpoint(self) -> str:
        return self.manifest["checkpoint_name"]

    @property
    def lora_names(self) -> list[str]:
        return list(self.manifest["loras"])

    def request(self, method: str, path: str, payload=None, timeout: float = 60.0):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:2000]
            raise AssertionError(f"{method} {path} -> HTTP {error.code}: {detail}\n{self.log_tail()}") from error
        return json.loads(body) if body else None

    def get(self, path: str, timeout: float = 60.0):
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, payload, timeout: float = REQUEST_TIMEOUT_S):
        return self.request("POST", path, payload, timeout=timeout)

    def txt2img_payload(self, prompt: str, **overrides) -> dict:
        """A small FLUX job on the tiny checkpoint: 64x64, Euler + Simple, 3 steps, CFG 1 (as FLUX-dev runs)."""
        payload = {
            "prompt": prompt,
            "negative_prompt": "",
            "width": 64,
            "height": 64,
            "steps": 3,
            "cfg_scale": 1.0,
            "distilled_cfg_scale": 3.5,
            "sampler_name": "Euler",  # "Euler a" gives NaN on a random tiny FLUX
            "scheduler": "Simple",
            "seed": 1234,
            "batch_size": 1,
            "n_iter": 1,
            "send_images": True,
            "save_images": False,
            "override_settings": {"sd_model_checkpoint": self.checkpoint},
        }
        payload.update(overrides)
        return payload

    def txt2img(self, prompt: str, **overrides) -> Txt2ImgResult:
        payload = self.txt2img_payload(prompt, **overrides)
        started = time.monotonic()
        response = self.post("/sdapi/v1/txt2img", payload)
        seconds = time.monotonic() - started
        TIMINGS.setdefault("txt2img", [])
        TIMINGS["txt2img"].append(seconds)
        images = [PngImage.decode(base64.b64decode(image.split(",", 1)[-1])) for image in response["images"]]
        return Txt2ImgResult(images, json.loads(response["info"]), response["parameters"], seconds)

    @contextlib.contextmanager
    def fault(self, stage: str):
        """Inside the block, FreeFuse's `stage` ("capture", "slic", "masks") raises in the server (test hook)."""
        path = self.data_dir / "freefuse-fault"
        path.write_text(stage, encoding="utf-8")
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

    def live_tensor_counts(self) -> list[int]:
        """Live tensors in the server as each FreeFuse sampling call started, in order (test hook)."""
        path = self.data_dir / "live-tensors.log"
        return [int(line) for line in path.read_text().split()] if path.exists() else []

    def log(self) -> str:
        """The server's console output, Neo's wrapped log records joined back into one line each (Neo prints a
        record in 80 columns with "file.py :: LEVEL" at the right of its first line)."""
        text = self.log_path.read_text(errors="replace")
        if not self.neo:
            return text
        lines: list[str] = []
        for line in text.splitlines():
            if line.endswith("  ") and not _NEO_RECORD_TAIL.search(line) and lines:
                lines[-1] += " " + line.strip()  # a wrapped record's continuation, padded to 80 columns
            else:
                lines.append(_NEO_RECORD_TAIL.sub("", line))
        return "\n".join(lines)

    def log_tail(self, lines: int = 60) -> str:
        return "--- webui log (tail) ---\n" + "\n".join(self.log().splitlines()[-lines:])


# ----------------------------------------------------------------------------------------------------- fixture


def _write_tiny(python: str, name: str, forge_root: Path, models: Path, data_dir: Path) -> dict:
    """Run tiny_sdxl.py, tiny_klein.py, tiny_qwen_image.py, tiny_zimage.py or tiny_chroma.py (`name`) with Forge's
    Python: checkpoint
    models/Stable-diffusion/<name>, its LoRAs and pipeline configs; its JSON manifest."""
    made = subprocess.run(
        [
            python,
            str(HERE / f"{name}.py"),
            "--forge",
            str(forge_root),
            "--checkpoint",
            str(models / "Stable-diffusion" / f"{name}.safetensors"),
            "--lora-dir",
            str(models / "Lora"),
            "--configs",
            str(data_dir / "tiny-configs"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ""},
    )
    if made.returncode != 0:
        pytest.fail(f"{name}.py failed ({made.returncode}):\n{made.stdout[-3000:]}\n{made.stderr[-3000:]}")
    return json.loads(made.stdout.strip().splitlines()[-1])


def _server_env(
    data_dir: Path,
    configs: str,
    sdxl_configs: str,
    python_paths: tuple[Path, ...] = (),
    klein_configs: str = "",
    qwen_image_configs: str = "",
    zimage_configs: str = "",
    chroma_configs: str = "",
) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("COMMANDLINE_ARGS", "PYTHONSTARTUP")}
    paths = (str(HOOK_DIR), *map(str, python_paths), os.environ.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(
        FREEFUSE_TEST_TINY_FLUX_CONFIGS=configs,
        FREEFUSE_TEST_TINY_SDXL_CONFIGS=sdxl_configs,
        FREEFUSE_TEST_TINY_KLEIN_CONFIGS=klein_configs,
        FREEFUSE_TEST_TINY_QWEN_IMAGE_CONFIGS=qwen_image_configs,  # webui_hook/tiny_qwen_image_hook.py
        FREEFUSE_TEST_TINY_ZIMAGE_CONFIGS=zimage_configs,
        FREEFUSE_TEST_TINY_CHROMA_CONFIGS=chroma_configs,
        FREEFUSE_TEST_WEBUI_ASSETS=str(data_dir / "webui-assets"),
        FREEFUSE_TEST_EXIT_WITH_PARENT="1",  # a server whose pytest was killed ends itself (sitecustomize.py)
        FREEFUSE_TEST_FAULT_FILE=str(data_dir / "freefuse-fault"),  # WebUI.fault(); no file, no fault
        FREEFUSE_TEST_TENSOR_LOG=str(data_dir / "live-tensors.log"),  # WebUI.live_tensor_counts(), for the soak
        CUDA_VISIBLE_DEVICES="",  # a CUDA build of torch stays on the CPU, as --always-cpu asks
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors on 2 shared cores: one thread is the fastest
    return env


def _stop(process: subprocess.Popen) -> None:
    """End the server and everything it started: it leads its own process group."""
    if process.poll() is None:
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    with contextlib.suppress(ProcessLookupError, PermissionError):  # children left after the leader exited
        os.killpg(process.pid, signal.SIGKILL)


def _wait_for_api(process: subprocess.Popen, url: str, log_path: Path, checkpoint: str) -> str:
    """Wait until the API answers *and* Forge has finished starting; returns Forge's own "Startup time" line.

    The API answers before it is ready: Forge serves (gradio launch) before it registers the API's routes, and
    registers them before it computes the scripts' default arguments; a txt2img in that window runs every
    always-on script with no arguments ("not enough values to unpack (expected 2, got 0)"). Forge prints
    "Startup time: ..." once everything, app_started callbacks included, is done.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    listed = False
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])
            pytest.fail(f"Forge's webui exited with {process.returncode} before its API came up:\n{tail}")
        if not listed:
            try:
                with urllib.request.urlopen(url + "/sdapi/v1/sd-models", timeout=5) as response:
                    models = json.loads(response.read())
                if not any(m.get("model_name") == checkpoint for m in models):
                    pytest.fail(f"the webui is up but lists no {checkpoint}: {models}")
                listed = True
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
        if listed:
            startup = [line for line in log_path.read_text(errors="replace").splitlines() if "Startup time:" in line]
            if startup:
                return startup[-1].strip()
        time.sleep(0.25)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])
    pytest.fail(f"Forge's webui did not finish starting in {STARTUP_TIMEOUT_S:.0f} s:\n{tail}")


@pytest.fixture(scope="session")
def webui(tmp_path_factory):
    with start_webui(tmp_path_factory) as server:
        yield server


@pytest.fixture
def browser():
    """Headless Chromium with a fresh profile (browser_page.py; a test module that uses it skips on its MISSING)."""
    from browser_page import chromium

    with chromium() as driver:
        yield driver


@contextlib.contextmanager
def start_webui(
    tmp_path_factory,
    extensions: dict[str, Path] | None = None,
    flags: tuple[str, ...] = (),
    python_paths: tuple[Path, ...] = (),
    prepare=None,
    record_timings: bool = True,
):
    """A webui server as the module docstring says; the tier's own `webui` is the plain one. A test module may start
    another (its own fixture) with more `extensions` ({folder name: path}, linked in), `flags`, `python_paths` (put
    on the server's PYTHONPATH after webui_hook/), and `prepare(data_dir)` run before the server starts."""
    forge_root, why = find_forge()
    if forge_root is None:
        pytest.skip(why)
    guess = forge_root / "repositories" / "huggingface_guess" / "huggingface_guess"
    if not is_neo(forge_root) and not guess.is_dir():
        # launch.py clones it unless --skip-prepare-environment, which this fixture passes (no network here)
        pytest.skip(f"Forge at {forge_root} has no repositories/huggingface_guess: run its launch.py once first")
    python, why = find_forge_python(forge_root)
    if python is None:
        pytest.skip(why)

    data_dir = tmp_path_factory.mktemp("forge-data")
    models = data_dir / "models"
    made = subprocess.run(
        [
            python,
            str(HERE / "tiny_models.py"),
            "--forge",
            str(forge_root),
            "--checkpoint",
            str(models / "Stable-diffusion" / "tiny_flux.safetensors"),
            "--lora-dir",
            str(models / "Lora"),
            "--configs",
            str(data_dir / "tiny-configs"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ""},
    )
    if made.returncode != 0:
        pytest.fail(f"tiny_models.py failed ({made.returncode}):\n{made.stdout[-3000:]}\n{made.stderr[-3000:]}")
    manifest = json.loads(made.stdout.strip().splitlines()[-1])
    manifest["sdxl"] = _write_tiny(python, "tiny_sdxl", forge_root, models, data_dir)
    if is_neo(forge_root):  # classic Forge has no FLUX.2, no Qwen-Image and no Z-Image
        manifest["klein"] = _write_tiny(python, "tiny_klein", forge_root, models, data_dir)
        manifest["qwen_image"] = _write_tiny(python, "tiny_qwen_image", forge_root, models, data_dir)
        manifest["zimage"] = _write_tiny(python, "tiny_zimage", forge_root, models, data_dir)
        manifest["chroma"] = _write_tiny(python, "tiny_chroma", forge_root, models, data_dir)
    # the trained toy world (it shares the tiny CLIP/T5/VAE configs) for tests/webui/test_toyworld_quality.py
    for source, folder in TOY_WORLD_FILES:
        shutil.copyfile(source, models / folder / source.name)

    (data_dir / "extensions").mkdir()
    (data_dir / "tmp").mkdir()  # Neo saves gallery images under <data dir>/tmp and does not create it
    (data_dir / "extensions" / EXTENSION_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    (data_dir / "extensions" / TEST_EXTENSION_NAME).symlink_to(HERE / "webui_extension", target_is_directory=True)
    for name, path in (extensions or {}).items():
        (data_dir / "extensions" / name).symlink_to(path, target_is_directory=True)
    if prepare is not None:
        prepare(data_dir)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = data_dir / "webui.log"
    command = [
        python,
        "launch.py",
        *server_flags(forge_root),
        *flags,
        "--data-dir",
        str(data_dir),
        "--server-name",
        "127.0.0.1",
        "--port",
        str(port),
        "--gradio-allowed-path",  # Forge serves its own page scripts from its root, outside our --data-dir
        str(forge_root),
    ]
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=forge_root,
            env=_server_env(
                data_dir,
                manifest["configs"],
                manifest["sdxl"]["configs"],
                python_paths,
                manifest.get("klein", {}).get("configs", ""),
                manifest.get("qwen_image", {}).get("configs", ""),
                zimage_configs=manifest.get("zimage", {}).get("configs", ""),
                chroma_configs=manifest.get("chroma", {}).get("configs", ""),
            ),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        forge_summary = _wait_for_api(process, url, log_path, manifest["checkpoint_name"])
        startup = time.monotonic() - started
        if record_timings:
            TIMINGS.update(startup=startup, url=url, log=str(log_path), forge_summary=forge_summary)
        print(f"\n[webui] Forge's webui up at {url} in {startup:.1f} s (log: {log_path})")
        yield WebUI(url, data_dir, log_path, manifest, startup, pid=process.pid, neo=is_neo(forge_root))
    finally:
        stopping = time.monotonic()
        _stop(process)
        if record_timings:
            TIMINGS["stop"] = time.monotonic() - stopping


def pytest_terminal_summary(terminalreporter):
    if "startup" not in TIMINGS:
        return
    calls = TIMINGS.get("txt2img", [])
    line = f"webui tier: Forge's webui started in {TIMINGS['startup']:.1f} s"
    if calls:
        line += f"; {len(calls)} txt2img calls, first {calls[0]:.1f} s (loads the model)"
        if len(calls) > 1:
            line += f", then {sum(calls[1:]) / (len(calls) - 1):.1f} s on average"
    if "stop" in TIMINGS:
        line += f"; stopped in {TIMINGS['stop']:.1f} s"
    terminalreporter.write_line(line + f" (log: {TIMINGS['log']})")
    terminalreporter.write_line(f"webui tier: Forge says {TIMINGS['forge_summary']}")
