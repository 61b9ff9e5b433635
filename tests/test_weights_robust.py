"""Writes that survive a power loss, and damaged-but-parseable files that fail in one line.

Durability: a rename publishes a file, so the file's data must be on the disk before it (else the final name can
hold an empty file after a power loss, and the file it replaced is gone too) and the folder after it (else the
rename itself can be undone). os.fsync is recorded, with what each call flushed (a file and its size at that
moment, or a folder), around os.replace.

Damaged JSON: an index, a config.json or our `scfm_config` metadata that parses but has the wrong shape (a list,
a null, a string for a number) is a WeightsError naming the file and the fix, never an AttributeError or a
TypeError from deep inside a loader."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.flux import FLUX_CONFIGS, Flux
from weights.atomic import atomic_path, atomic_save, durable_replace
from weights.families import checkpoint_family
from weights.families.flux import config_to_diffusers
from weights.io import WeightsError, config_from_metadata
from weights.reader import read_config_json, weight_files
from weights.stream import StreamWriter, write_streaming
from weights.transformer import load_flux, transformer_state_dict

posix = pytest.mark.skipif(os.name != "posix", reason="folders are fsynced on POSIX only")


# ----- durability ---------------------------------------------------------------------------------------------


@pytest.fixture
def syscalls(monkeypatch):
    """The fsyncs and renames made, in order: ("file", inode, size), ("dir", inode), ("replace", target)."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("dir", st.st_ino) if stat.S_ISDIR(st.st_mode) else ("file", st.st_ino, st.st_size))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", str(dst)))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _with_atomic_path(path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(b"new contents")


def _with_atomic_save(path: Path) -> None:
    atomic_save({"x": torch.arange(6.0)}, path, overwrite=True)


def _with_stream(path: Path) -> None:
    write_streaming(path, [("x", torch.float32, (6,)), ("y", torch.float16, (2, 3))],
                    [("x", torch.arange(6.0)), ("y", torch.ones(2, 3, dtype=torch.float16))], {"k": "v"})


WRITERS = pytest.mark.parametrize("write", [_with_atomic_path, _with_atomic_save, _with_stream],
                                  ids=["atomic_path", "atomic_save", "stream"])


@posix
@WRITERS
def test_the_file_is_flushed_before_the_rename_and_its_folder_after(write, syscalls, tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"the user's previous file")  # replaced: with no flush, a power loss could lose both copies
    write(path)
    st, folder = os.stat(path), os.stat(tmp_path)
    renamed = syscalls.index(("replace", str(path)))
    # the inode the name now holds, at its final size: flushed after the last byte was written
    assert ("file", st.st_ino, st.st_size) in syscalls[:renamed], syscalls
    assert ("dir", folder.st_ino) in syscalls[renamed + 1:], syscalls


@WRITERS
def test_a_failed_flush_keeps_the_old_file_and_leaves_no_temp(write, monkeypatch, tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"the user's previous file")

    def full_disk(fd):  # delayed allocation: ext4 and XFS may report a full disk only here
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        write(path)
    assert path.read_bytes() == b"the user's previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


@posix
@WRITERS
def test_a_file_system_that_cannot_sync_folders_still_writes(write, monkeypatch, tmp_path):
    real = os.fsync

    def no_dir_sync(fd):  # some network and FUSE file systems
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd)

    monkeypatch.setattr(os, "fsync", no_dir_sync)
    path = tmp_path / "out.safetensors"
    write(path)
    assert path.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


@posix
def test_a_disk_error_on_the_folder_flush_is_raised(monkeypatch, tmp_path):
    real = os.fsync

    def failing_disk(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fsync", failing_disk)
    with pytest.raises(OSError, match="Input/output"):  # not reported as a write that will survive
        atomic_save({"x": torch.ones(2)}, tmp_path / "out.safetensors")


@posix
def test_durable_replace_of_a_folder_flushes_every_file_and_folder_first(syscalls, tmp_path):
    tmp = tmp_path / ".ckpt.tmp"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "a.bin").write_bytes(b"a" * 10)
    (tmp / "sub" / "b.bin").write_bytes(b"b" * 3)
    inodes = {p: os.stat(p) for p in (tmp / "a.bin", tmp / "sub" / "b.bin", tmp / "sub", tmp)}
    durable_replace(tmp, tmp_path / "ckpt")
    renamed = syscalls.index(("replace", str(tmp_path / "ckpt")))
    before = syscalls[:renamed]
    for p, st in inodes.items():
        want = ("dir", st.st_ino) if stat.S_ISDIR(st.st_mode) else ("file", st.st_ino, st.st_size)
        assert want in before, (p, syscalls)
    assert ("dir", os.stat(tmp_path).st_ino) in syscalls[renamed + 1:]
    assert (tmp_path / "ckpt" / "sub" / "b.bin").read_bytes() == b"bbb"


# ----- the streaming writer's header checks -------------------------------------------------------------------


def _temp_fds() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if target.endswith(".tmp"):
            found.append(target)
    return found


@pytest.mark.parametrize("plan, metadata, named", [
    ([("x", torch.float32, (4,))], {"step": 3}, "'step' = 3 (int, not str)"),
    ([("x", torch.float32, (4,))], {1: "v"}, "metadata key 1 (int, not str)"),
    ([("x", torch.complex64, (4,))], None, "tensor x: dtype torch.complex64 has no safetensors name"),
    ([("x", torch.float32, (4,)), ("x", torch.float32, (4,))], None, "tensor key 'x' is planned twice"),
    ([("__metadata__", torch.float32, (4,))], None, "tensor key '__metadata__' cannot be written"),
    ([("x", torch.float32, (-1,))], None, "tensor x: shape [-1]"),
], ids=["metadata-value", "metadata-key", "dtype", "duplicate", "reserved", "shape"])
def test_a_bad_plan_is_one_line_and_leaves_no_temp(plan, metadata, named, tmp_path):
    fds = _temp_fds() if os.path.isdir("/proc/self/fd") else []
    with pytest.raises(WeightsError) as e:
        StreamWriter(tmp_path / "out.safetensors", plan, metadata)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "out.safetensors")), message
    assert named in message, message
    assert list(tmp_path.iterdir()) == []
    if os.path.isdir("/proc/self/fd"):
        assert _temp_fds() == fds  # no descriptor left open on a deleted temp


def test_closing_the_writer_directly_cleans_up_after_a_failed_flush(monkeypatch, tmp_path):
    w = StreamWriter(tmp_path / "out.safetensors", [("x", torch.float32, (2,))])
    w.write("x", torch.ones(2))

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        w.close()  # no `with`: close itself must remove the temp
    assert list(tmp_path.iterdir()) == []


def test_the_streamed_file_still_reads_back(tmp_path):
    _with_stream(tmp_path / "s.safetensors")
    got = load_file(str(tmp_path / "s.safetensors"))
    assert torch.equal(got["x"], torch.arange(6.0)) and torch.equal(got["y"], torch.ones(2, 3, dtype=torch.float16))


# ----- damaged JSON -------------------------------------------------------------------------------------------


def _one_line(e: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(e.value)
    assert type(e.value) is WeightsError and "\n" not in message, message
    for part in parts:
        assert part in message, message


@pytest.fixture(scope="module")
def flux_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in transformer_state_dict(Flux(FLUX_CONFIGS["tiny"])).items()}


@pytest.mark.parametrize("index", [
    "[]", '"weights"', '{"weight_map": ["model.safetensors"]}', '{"weight_map": {"a": null}}',
    '{"weight_map": {"a": 3}}', '{"weight_map": {"a": ""}}', '{"metadata": {}}',
], ids=["list", "string", "map-is-list", "null-file", "number-file", "empty-name", "no-map"])
def test_a_damaged_index_is_one_line(index, flux_sd, tmp_path):
    save_file(flux_sd, tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(WeightsError) as e:
        weight_files(tmp_path)
    _one_line(e, "model.safetensors.index.json: damaged index", "re-download it, or delete it")
    with pytest.raises(WeightsError) as e:
        load_flux(tmp_path)  # and through a loader
    _one_line(e, "damaged index")


@pytest.mark.parametrize("name, read, says", [
    ("model.safetensors.index.json", weight_files, ("unreadable index", "re-download")),
    ("config.json", read_config_json, ("config.json: unreadable", "fix or delete it")),
], ids=["index", "config"])
def test_a_json_file_that_is_not_text_is_one_line(tmp_path, name, read, says):
    (tmp_path / name).write_bytes(b"\xff\xfe\x00garbage{")
    with pytest.raises(WeightsError) as e:
        read(tmp_path)
    _one_line(e, *says)


def test_an_empty_weight_map_falls_back_to_the_folders_file(flux_sd, tmp_path):
    """A stub index naming no file beside a single model.safetensors: the folder is read as if it had none (it
    once said "not a Flux", about a file that is one)."""
    save_file(flux_sd, tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    assert weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    model = load_flux(tmp_path)
    assert torch.equal(model.state_dict()["img_in.weight"], flux_sd["img_in.weight"])


def test_an_empty_weight_map_with_no_file_says_so(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(WeightsError) as e:
        weight_files(tmp_path)
    _one_line(e, "no .safetensors files")


@pytest.mark.parametrize("text", ["[]", '"flux"', "3", "null"])
def test_a_config_json_that_is_not_an_object_is_one_line(text, flux_sd, tmp_path):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(WeightsError) as e:
        read_config_json(tmp_path)
    _one_line(e, "config.json: not a JSON object", "fix or delete it")
    save_file(flux_sd, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError) as e:
        load_flux(tmp_path)
    _one_line(e, "config.json: not a JSON object")


def test_the_vae_loader_refuses_a_list_config_json_in_one_line(tmp_path):
    from model.vae import VAE_CONFIGS, AutoEncoder
    from weights.vae import load_vae

    save_file({k: v.contiguous() for k, v in AutoEncoder(VAE_CONFIGS["tiny"]).state_dict().items()},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(WeightsError) as e:
        load_vae(tmp_path)
    _one_line(e, "config.json: not a JSON object")


@pytest.mark.parametrize("field, value", [("num_layers", "2"), ("num_attention_heads", "2"),
                                          ("axes_dims_rope", 4)])
def test_a_config_json_field_of_the_wrong_type_is_one_line(field, value, flux_sd, tmp_path):
    save_file(flux_sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**config_to_diffusers(FLUX_CONFIGS["tiny"]), field: value}))
    with pytest.raises(WeightsError) as e:
        load_flux(tmp_path)
    _one_line(e, str(tmp_path), "config from its config.json is invalid", "fix or delete the config.json")


@pytest.mark.parametrize("meta, problem", [
    ('{"family": "flux", "config": [1]}', "is a list, not an object"),
    ('{"family": "flux"}', "is a NoneType, not an object"),
    ('{"family": "flux", "config": {"depth": "2"}}', "is invalid"),
    ('{"family": "flux", "config": {"hidden_size": 33}}', "is invalid (hidden_size 33"),
])
def test_a_damaged_stored_config_is_one_line(meta, problem, flux_sd, tmp_path):
    path = tmp_path / "f.safetensors"
    save_file(flux_sd, path, metadata={"scfm_config": meta})
    with pytest.raises(WeightsError) as e:
        load_flux(path)
    _one_line(e, f"{path}: the Flux config from its metadata (scfm_config) {problem}", "re-export the file")


def test_a_stored_config_that_is_not_an_object_is_ignored_like_bad_json(flux_sd, tmp_path):
    """Neither names a config: the key shapes give it, as for a file our savers did not write."""
    for meta in ('["flux"]', "not json"):
        assert config_from_metadata({"scfm_config": meta}) is None
        assert checkpoint_family(flux_sd.keys(), {"scfm_config": meta}).name == "flux"
        path = tmp_path / "f.safetensors"
        save_file(flux_sd, path, metadata={"scfm_config": meta})
        model = load_flux(path)
        assert model.config.depth == FLUX_CONFIGS["tiny"].depth
        assert torch.equal(model.state_dict()["img_in.weight"], flux_sd["img_in.weight"])


def test_a_callers_own_bad_config_keeps_its_error(flux_sd, tmp_path):
    """config= is the caller's code, not a damaged file: its error is not reworded as one."""
    from model.flux import FluxConfig

    path = tmp_path / "f.safetensors"
    save_file(flux_sd, path)
    bad = FluxConfig(**{**FLUX_CONFIGS["tiny"].to_dict(), "depth": "2"})
    with pytest.raises(TypeError, match="^'str' object cannot be interpreted as an integer$"):  # Python's own words
        load_flux(path, config=bad)
