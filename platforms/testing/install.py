"""Install a plugin for real, as its own distribution, into a fresh environment.

Rule: the environment is a new venv that sees the running environment's packages (torch,
engine) through a `.pth` file, so nothing heavy is installed again; the plugin itself goes in
with pip from its source folder as a regular (not editable) install, so what is tested is the
installed copy found through its `engine.plugins` entry point.
"""

from __future__ import annotations

import site
import subprocess
import sys
import venv
from pathlib import Path


def install_plugin_into_fresh_env(plugin_dir: Path, env_dir: Path, timeout_s: float = 300
                                  ) -> Path:
    """Create the venv at `env_dir`, pip-install `plugin_dir` into it; return its python."""
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    # `import` lines of a .pth run at startup; addsitedir also runs the outer env's own .pth
    # files, which is where editable installs (engine itself, in a checkout) live.
    lines = [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages()]
    Path(purelib, "outer-env.pth").write_text("\n".join(lines) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-build-isolation", "--no-index", "--quiet", str(plugin_dir)],
        check=True, timeout=timeout_s,
    )
    return python
