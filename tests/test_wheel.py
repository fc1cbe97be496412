"""The built wheel ships every config and its ``dmlrun`` command composes them."""

import site
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_install_runs_cfg_job(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                    str(dist), str(REPO)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = dist.glob("dmlrun-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"dmlrun/configs/{p.relative_to(REPO / 'configs').as_posix()}"
               for p in (REPO / "configs").rglob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    modules = {f"dmlrun/{p.relative_to(REPO / 'dmlrun').as_posix()}"
               for p in (REPO / "dmlrun").rglob("*.py")}
    assert modules <= names, sorted(modules - names)  # every package, e.g. dmlrun/semi/

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True)
    # dependencies (torch, hydra, ...) come from this environment, dmlrun only from the wheel
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], check=True, capture_output=True, text=True)
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(purelib.stdout.strip(), "deps.pth").write_text("\n".join(deps) + "\n")

    where = subprocess.run([str(py), "-c", "import dmlrun; print(dmlrun.__file__)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path)
    assert str(venv) in where.stdout

    user_conf = tmp_path / "myconf" / "loss"
    user_conf.mkdir(parents=True)
    (user_conf / "wide_triplet.yaml").write_text(
        "defaults:\n  - triplet\n  - _self_\nmargin: 2.5\n")
    res = subprocess.run([str(venv / "bin" / "dmlrun"), "--config-dir", str(tmp_path / "myconf"),
                          "loss=wide_triplet", "--cfg", "job"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "_target_: dmlrun.losses.triplet.TripletLoss" in res.stdout
    assert "margin: 2.5" in res.stdout
    assert "_target_: dmlrun.models.convnet.ConvNet" in res.stdout
