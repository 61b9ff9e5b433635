"""Every file and folder we write gets the user's umask (0644 / 0755 under the usual 022), as a plain open() would:
written through a temp file and a rename, they once kept tempfile's private 0600 / 0700, so a ComfyUI in Docker
or another user could not read our LoRAs, checkpoints or images."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from PIL import Image

from distill.checkpoint import save_checkpoint
from distill.evaluation import write_json
from sampling.demo import DEMO_FOLDER, DEMO_LORA
from sampling.png_record import save_png
from weights.atomic import atomic_save
from weights.convert import convert_checkpoint
from weights.lora import read_lora
from weights.lora_write import write_lora

pytestmark = pytest.mark.skipif(os.name != "posix", reason="modes and umask are POSIX")


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_folders_get_the_umask(umask, tmp_path):
    file_mode, folder_mode = 0o666 & ~umask, 0o777 & ~umask
    files = [atomic_save({"x": torch.ones(2)}, tmp_path / "t.safetensors"),
             write_lora(read_lora(DEMO_LORA), tmp_path / "lora.safetensors", "kohya")]
    save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", {"prompt": "p"})
    write_json(tmp_path / "report.json", {"a": 1})
    files += [tmp_path / "a.png", tmp_path / "report.json"]
    # streamed conversions: one file, and a folder of files
    files.append(convert_checkpoint(DEMO_FOLDER / "transformer", tmp_path / "flux.safetensors", "official"))
    folders = [convert_checkpoint(tmp_path / "flux.safetensors", tmp_path / "flux-diffusers", "diffusers")]
    files += sorted(folders[0].iterdir())
    folders.append(save_checkpoint(tmp_path / "ckpt", 3, {"w": torch.zeros(2)}, {"config": {}}, keep=2))
    files += sorted(folders[1].iterdir())
    assert {str(f.relative_to(tmp_path)): mode(f) for f in files} == \
        {str(f.relative_to(tmp_path)): file_mode for f in files}
    assert [mode(f) for f in folders] == [folder_mode] * 2
    # and no temp file or folder is left behind
    assert [p.name for p in tmp_path.rglob(".*")] == []
