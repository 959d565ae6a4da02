"""Which process writes which file (tests/test_multinode.py puts this directory on PYTHONPATH).

Active only in torchrun's worker processes (RANK set) when FILE_AUDIT_DIR is set: every open for
writing, by Python (`open`, `os.open`: the "open" audit event), by `torch.save` to a path (which
opens the file in C++) or by `safetensors.torch.save_file` (Rust), appends "RANK<TAB>PATH" to FILE_AUDIT_DIR/<pid>.tsv. The test then asserts
that each file under the job's out_dir had exactly one writer rank.
"""
import os
import sys

_dir = os.environ.get("FILE_AUDIT_DIR")
if _dir and "RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
    _rank = os.environ["RANK"]
    _fd = os.open(os.path.join(_dir, f"{os.getpid()}.tsv"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _busy = [False]
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _log(path) -> None:
        if _busy[0]:
            return
        _busy[0] = True
        try:
            os.write(_fd, f"{_rank}\t{os.path.abspath(os.fsdecode(path))}\n".encode())
        finally:
            _busy[0] = False

    def _hook(event, args):
        if event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE)
        if writing:
            _log(path)

    sys.addaudithook(_hook)

    import torch  # the workers import it anyway

    _save = torch.save

    def _audited_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, bytes, os.PathLike)):
            _log(f)
        return _save(obj, f, *args, **kwargs)

    torch.save = _audited_save

    try:  # safetensors writes its files in Rust, past the "open" audit event
        import safetensors.torch as _st
    except ImportError:
        _st = None
    if _st is not None:
        _st_save = _st.save_file

        def _audited_save_file(tensors, filename, *args, **kwargs):
            _log(filename)
            return _st_save(tensors, filename, *args, **kwargs)

        _st.save_file = _audited_save_file
