"""Re-make the README's pictures: a TensorBoard screenshot of the demo run and a depth profile drawn by the code.

Needs Debian's Chromium (``apt-get install chromium``: ``/usr/bin/chromium``) and the ``plots`` extra. Trains
the demo with its planted problems (``normcheck-demo fit --config demo.yaml --config demo_problems.yaml``) into a
temporary log dir, serves it with a local TensorBoard, and takes headless screenshots of its tabs:

    python notebooks/tensorboard_screenshot.py            # writes notebooks/img/*.png

Not run in CI (it needs a browser); run it again when the layout or the pictures change.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
# flags for a sandboxed machine with no network: no background connections, no GPU, a fresh profile
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
#: (file name, TensorBoard page): the Custom Scalars layout and the depth-profile images
PAGES = [("tensorboard_custom_scalars.png", "#custom_scalars"), ("tensorboard_images.png", "#images")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train(logdir: Path) -> Path:
    """The demo with its planted problems, logged to ``logdir``; returns the run's log dir."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_normcheck.cli",
            "fit",
            "--config",
            "demo.yaml",
            "--config",
            "demo_problems.yaml",
            f"--trainer.logger.init_args.save_dir={logdir}",
            "--trainer.max_steps=300",
        ],
        check=True,
        cwd=logdir,
    )
    return next(p.parent for p in sorted(logdir.rglob("events.out.tfevents.*")))


def _wait(url: str, seconds: float = 60.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"TensorBoard did not answer at {url}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "img", help="where the PNGs go")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = _train(Path(tmp))
        profile = run_dir / "normcheck_profiles" / "act_rms.png"
        if profile.exists():
            shutil.copy(profile, args.out / "depth_profile_act_rms.png")
        port = _free_port()
        board = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                str(tmp),
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait(f"http://127.0.0.1:{port}/")
            for name, page in PAGES:
                with tempfile.TemporaryDirectory() as profile_dir:
                    subprocess.run(
                        [
                            args.chromium,
                            *CHROMIUM_FLAGS,
                            f"--user-data-dir={profile_dir}",
                            "--window-size=1400,1100",
                            "--virtual-time-budget=20000",
                            f"--screenshot={args.out / name}",
                            f"http://127.0.0.1:{port}/{page}",
                        ],
                        check=True,
                        timeout=120,
                        stderr=subprocess.DEVNULL,  # Chromium's complaints about the missing D-Bus and GPU
                    )
                print(f"wrote {args.out / name}")
        finally:
            board.terminate()
            board.wait(timeout=30)


if __name__ == "__main__":
    main()
