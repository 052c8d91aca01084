"""The plumbing of full_finetune.py: everything that is not about learning.

    devices and precision   which device and number format a run uses, and why
    processes               torchrun: the process group, gathering, agreeing on a stop
    stop signals            Ctrl-C and SIGTERM, handled by one policy
    files                   atomic writes, a full disk told in one sentence
    the output folder       owned, locked, published as one set, recovered after a kill

full_finetune.py imports this module; this module never imports it. Every call here works on
Linux, macOS and Windows alike: no signal masks, no process-id probing, no fork, and paths built
with pathlib only.
"""

import contextlib
import datetime
import errno
import json
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch

from config import FinetuneError


def name_list(names, limit=10):
    """'a', 'b', 'c' - at most `limit` names, then how many more: error messages stay one line."""
    names = [repr(name) for name in names]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# --------------------------------------------------------------------------------------------
# Devices and precision
# --------------------------------------------------------------------------------------------

def mps_available():
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def choose_device(name):
    """The torch device DEVICE names ("auto": a CUDA GPU, else Apple's MPS, else the CPU); one
    that this machine or torch build lacks is one sentence."""
    if name == "auto":
        if torch.cuda.is_available():  # under torchrun each process drives the GPU of its local rank
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FinetuneError(f"DEVICE {name!r} is not a device torch knows; use auto, cpu, cuda, cuda:N or "
                            "mps.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FinetuneError(f"DEVICE is {name!r} but this machine has no CUDA GPU; use auto or cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FinetuneError(f"DEVICE is {name!r} but this machine has {torch.cuda.device_count()} CUDA "
                                "GPU(s), numbered from 0.")
    elif device.type == "mps" and not mps_available():
        raise FinetuneError(f"DEVICE is {name!r} but this torch build or machine has no Apple MPS support.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise FinetuneError(f"DEVICE {name!r} is not supported here; use auto, cpu, cuda, cuda:N or mps.")
    return device


def cpu_supports_bf16():
    """True where the CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX); emulated bf16 is slow.
    Arm CPUs (Apple Silicon) report False: their bf16 matmuls are not faster than fp32 in torch."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def choose_precision(setting, device):
    """MIXED_PRECISION ('auto', 'bf16', 'fp16', 'no') resolved to 'bf16', 'fp16' or 'fp32' on
    `device`, and why, in a few words. Native bf16 needs compute capability 8.0 (A100, RTX 30xx
    and newer); older GPUs (T4, V100, P100) only emulate it, slowly, so there "auto" is fp16.
    On Apple's MPS "auto" is fp32: fp16 autocast works there but is asked for, not assumed."""
    asked = {"no": "fp32"}.get(setting, setting)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        native_bf16 = major >= 8
        if setting == "auto":
            if native_bf16:
                return "bf16", f"{name} has native bf16"
            return "fp16", f"{name} (compute capability {major}.{minor}) has no native bf16"
        if setting == "bf16" and not native_bf16:
            return "bf16", f"as asked, though {name} only emulates bf16 (fp16 is faster there)"
        return asked, "as asked"
    if device.type == "mps":
        if setting == "auto":
            return "fp32", "Apple MPS: fp32 unless MIXED_PRECISION asks for fp16"
        return asked, "as asked"
    native = cpu_supports_bf16()
    if setting in ("auto", "fp16"):
        chosen = "bf16" if native else "fp32"
        reason = "this CPU has native bf16" if native else "this CPU has no native bf16"
        if setting == "fp16":
            print(f"note: fp16 needs a GPU; using {chosen} on this {device.type} instead.")
        return chosen, reason
    if setting == "bf16" and not native:
        return "bf16", "as asked, though this CPU only emulates bf16 (slow)"
    return asked, "as asked"


@contextlib.contextmanager
def device_errors(device):
    """What the device cannot run, told in one sentence with the way out: Apple's MPS lacks some
    operations that CUDA and the CPU have."""
    try:
        yield
    except (NotImplementedError, RuntimeError) as err:
        if device.type != "mps" or isinstance(err, torch.OutOfMemoryError):
            raise
        first_line = str(err).strip().splitlines()[0].rstrip(".")
        raise FinetuneError(f"Apple's MPS could not run this ({first_line}); run again with --device cpu.") from None


def pins_memory(device):
    """Whether batches go through pinned host memory: on a CUDA GPU, where it lets the copy to the
    device overlap compute (elsewhere non_blocking copies gain nothing from it)."""
    return device.type == "cuda"


def autocast_context(precision, device):
    """The context every forward pass runs in: autocast to bf16 or fp16, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# --------------------------------------------------------------------------------------------
# Processes: torchrun's process group
# --------------------------------------------------------------------------------------------

def launched_rank():
    """This process's rank under torchrun (0 otherwise), known before the process group exists."""
    return int(os.environ.get("RANK", 0))


def init_distributed():
    """Join the process group when launched by torchrun (which sets LOCAL_RANK): nccl on CUDA,
    one GPU per local rank, gloo elsewhere. Only rank 0 prints. A plain `python full_finetune.py`
    sets nothing up and stays one process."""
    import torch.distributed as dist

    if "LOCAL_RANK" not in os.environ or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # A rank that dies makes torchrun stop the others; the timeout bounds any other wait.
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            timeout=datetime.timedelta(minutes=10))
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def finish_distributed():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world_size():
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather_objects(item, world_size):
    """Every rank's `item`, in rank order, on every rank (just [item] in a single process)."""
    if world_size == 1:
        return [item]
    import torch.distributed as dist

    items = [None] * world_size
    dist.all_gather_object(items, item)
    return items


def sum_over_processes(tensor, world_size):
    """`tensor` summed over every process, in place (itself in a single process)."""
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


class StopAgreement:
    """Whether any process was asked to stop, agreed by all. Every process must stop after the
    same optimizer step, or the others would wait for it in their next all-reduce. Each step
    starts an asynchronous all-reduce of this process's request and reads the previous step's,
    which finished long ago: the stop lands one step after the request, without the step ever
    waiting for the host (so torchrun's 30-second grace after Ctrl-C always suffices)."""

    def __init__(self, device, world_size):
        self.device, self.world_size = device, world_size
        self.requested = False
        self._pending = None  # (work, flag) of the all-reduce started at the previous step

    def after_step(self):
        """True when every process is to stop now."""
        if self.world_size == 1:
            return self.requested
        import torch.distributed as dist

        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = bool(flag.item())
        flag = torch.tensor(float(self.requested), device=self.device)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), flag)
        return agreed

    def end_of_epoch(self):
        """At an epoch's end every process agrees at once (a blocking all-reduce): no request may
        cross into the next epoch's batch order."""
        if self.world_size == 1:
            return self.requested
        import torch.distributed as dist

        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        flag = torch.tensor(float(self.requested), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def leave_together(status):
    """Exit `status` with the other processes. torchrun stops the rest when one process exits;
    every process meets the same bad input, so each waits (10 s at most) for the others to meet
    it too, and a stop signal no longer changes its status."""
    import torch.distributed as dist

    if dist.is_initialized():
        ignore_stop_signals()
        with contextlib.suppress(Exception):
            dist.barrier(async_op=True).wait(timeout=datetime.timedelta(seconds=10))
    return status


# --------------------------------------------------------------------------------------------
# Stop signals: one policy for Ctrl-C (SIGINT) and SIGTERM
# --------------------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # both exist on Windows too


def can_handle_signals():
    """Python lets only the main thread set signal handlers; elsewhere (a notebook's worker
    thread) a run goes on with whatever handlers there are."""
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def on_stop_signals(handle):
    """While the block runs, a stop signal calls handle(signal name, stop signals received in
    the block so far); it may raise (KeyboardInterrupt stops at once). The handlers found are
    restored afterwards."""
    if not can_handle_signals():
        yield
        return
    received = 0

    def handler(signum, frame):
        nonlocal received
        received += 1
        handle(signal.Signals(signum).name, received)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def ignore_stop_signals():
    """From now on, for the rest of the process: its exit status is decided."""
    if can_handle_signals():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def interrupt(name, times):
    """The policy outside the training loop: a stop signal is Ctrl-C."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals_held():
    """Hold stop signals until the block ends (a few renames that must all happen), then deliver
    the first one to the handler outside."""
    held = []
    with on_stop_signals(lambda name, times: held.append(getattr(signal, name))):
        yield
    if held:
        signal.raise_signal(held[0])


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def file_errors():
    """The exceptions of a file that cannot be written (no space, no permission) or read (missing,
    truncated): OSError, and safetensors' own error (transformers saves and loads weights with it)."""
    from safetensors import SafetensorError

    return OSError, SafetensorError


def write_failed(path, err, advice):
    """A failed write (a full disk, no permission) as one sentence."""
    code = getattr(err, "errno", None)
    if code is None and (match := re.search(r"os error (\d+)", str(err))):  # safetensors says it in words
        code = int(match.group(1))
    reason = "no space left on the device" if code == errno.ENOSPC else (getattr(err, "strerror", None) or str(err))
    return FinetuneError(f"Cannot write {path} ({reason}); {advice}")


class _WriteRecorder:
    """A file for torch.save that remembers the OSError of a failed write: torch reports it as a
    RuntimeError about file positions."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self):
        return self.file.flush()


def save_torch(obj, path):
    """torch.save, where a full disk or a missing permission raises the OSError it is."""
    with open(path, "wb") as file:
        recorder = _WriteRecorder(file)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise


TEMPORARY = re.compile(r"\..+\.tmp-\d+")  # temporary_name's pattern


def temporary_name(name):
    """A hidden temporary name beside `name`, unique to this process."""
    return f".{name}.tmp-{os.getpid()}"


def write_atomically(path, write, advice="the earlier file is kept."):
    """Call write(temporary_path), then rename it over `path`: readers see the old or the new
    file, never half of one. A failed write removes the temporary and is one sentence."""
    path = Path(path)
    tmp = path.with_name(temporary_name(path.name))
    try:
        write(tmp)
        os.replace(tmp, path)
    except file_errors() as err:
        raise write_failed(path, err, advice) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def same_file(a, b):
    return Path(a).resolve() == Path(b).resolve()


def write_user_file(path, write, inputs=()):
    """Write a file the user named, creating its folder; never over one of the `inputs` the
    command reads, and failures are one sentence."""
    path = Path(path)
    for name, source in inputs:
        if source is not None and same_file(path, source):
            raise FinetuneError(f"{path} is {name}; write to another file.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_failed(path, err, "choose another path.") from None
    write_atomically(path, write, advice="choose another path.")


def write_json(path, data):
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_csv(path, frame):
    frame.to_csv(path, index=False, encoding="utf-8")


# --------------------------------------------------------------------------------------------
# The output folder: owned, locked, published as one set
# --------------------------------------------------------------------------------------------

OWNER_FILE = ".full_finetune_outputs.json"  # in a folder this program writes: the files of its last run
LOCK_FILE = ".full_finetune.lock"
STAGING_PREFIX = ".staging-"
STAGED_MARK = "STAGED_BY_FULL_FINETUNE"  # first file of a staging folder: proof that we made it
COMPLETE_MARK = "COMPLETE"  # last file of a staging folder: every output is in it


class OutputFolder:
    """The folder a run writes into, held by this process for as long as the run lasts.

    Opening it refuses what is not this program's to write: the root of a drive, and a folder
    holding files it did not write (a data folder, a home folder); a folder it wrote before
    carries OWNER_FILE. It takes a lock (filelock: released by the operating system when the
    process dies, so a crash cannot leave it stuck) so that two runs never share the folder, and
    tidies what a killed run of its own left: a staging folder that was complete is moved into
    place, an unfinished one and stale temporaries are deleted. Nothing outside the folder is
    touched, and nothing in it that this program did not make.

    `is_own_name(name)` says which visible names the caller writes; a folder of an earlier
    version (no OWNER_FILE) is taken over when it holds only those. Under torchrun only rank 0
    opens, locks and writes; the others only check.
    """

    _held = {}  # resolved path -> (folder, times opened) in this process: opening twice is fine

    def __init__(self, path, is_own_name):
        self.path = Path(path)
        self.is_own_name = is_own_name
        self._lock = None

    @classmethod
    @contextlib.contextmanager
    def held(cls, path, is_own_name, writer=True):
        """The open folder for the block; the same object when this process already holds it."""
        key = str(Path(path).resolve())
        if key in cls._held:
            folder, times = cls._held[key]
            cls._held[key] = (folder, times + 1)
        else:
            folder = cls(path, is_own_name)
            folder._open(writer)
            cls._held[key] = (folder, 1)
        try:
            yield folder
        finally:
            folder, times = cls._held.pop(key)
            if times > 1:
                cls._held[key] = (folder, times - 1)
            else:
                folder._close()

    def _open(self, writer):
        path = self.path
        if path.resolve() == Path(path.resolve().anchor):
            raise FinetuneError(f"OUTPUT_DIR {path} is the root of the file system; choose a folder of its own.")
        if path.exists() and not path.is_dir():
            raise FinetuneError(f"Cannot write to the output directory {path} (it is a file); choose another with "
                                "--output-dir or OUTPUT_DIR.")
        foreign = self._foreign_entries()
        if foreign:
            raise FinetuneError(f"OUTPUT_DIR {path} holds files full_finetune.py did not write "
                                f"({name_list(foreign, 3)}); choose a new or empty folder with --output-dir, "
                                "so that nothing of yours is replaced.")
        if not writer:
            return
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / temporary_name("write-test")
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise FinetuneError(f"Cannot write to the output directory {path} ({err.strerror}); "
                                "choose another with --output-dir or OUTPUT_DIR.") from None
        from filelock import FileLock, Timeout

        self._lock = FileLock(str(path / LOCK_FILE), timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            self._lock = None
            raise FinetuneError(f"Another run is writing to {path}; wait for it to finish, or choose another "
                                "--output-dir.") from None
        if not (path / OWNER_FILE).is_file():
            write_atomically(path / OWNER_FILE, lambda tmp: write_json(tmp, {"published": self._own_entries()}))
        self._recover()

    def _close(self):
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _own_entries(self):
        return sorted(p.name for p in self.path.iterdir() if not p.name.startswith(".") and self.is_own_name(p.name))

    def _foreign_entries(self):
        if not self.path.is_dir() or (self.path / OWNER_FILE).is_file():
            return []
        return sorted(p.name for p in self.path.iterdir()
                      if not (p.name.startswith(".") and self._is_hidden_own(p.name)) and not self.is_own_name(p.name))

    @staticmethod
    def _is_hidden_own(name):
        return (name in (OWNER_FILE, LOCK_FILE) or name.startswith(STAGING_PREFIX)
                or bool(TEMPORARY.fullmatch(name)))

    def _recover(self):
        """Finish or drop what a killed run left (the lock says no run of ours is writing here)."""
        remove_stale_temporaries(self.path)
        for entry in sorted(self.path.glob(STAGING_PREFIX + "*")):
            if not (entry / STAGED_MARK).is_file():
                continue  # not provably ours: left alone
            if (entry / COMPLETE_MARK).is_file():
                self._move_into_place(entry)
            else:
                shutil.rmtree(entry, ignore_errors=True)

    def published(self):
        """The files of the last run published here."""
        try:
            return json.loads((self.path / OWNER_FILE).read_text(encoding="utf-8"))["published"]
        except (OSError, ValueError, KeyError, TypeError):
            return self._own_entries()

    def publish(self, write):
        """Write a run's outputs as one set: write(folder) fills a fresh staging folder; once it
        is complete, its files replace the last run's set (signals held meanwhile), files of that
        set the new one lacks included. A failure while writing (a full disk) deletes the staging
        folder and leaves every earlier output as it was; a kill during the move is finished when
        the folder is next opened."""
        staging = self.path / f"{STAGING_PREFIX}{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            (staging / "new").mkdir(parents=True)
            (staging / STAGED_MARK).write_text("made by full_finetune.py\n")
            write(staging / "new")
            names = sorted(p.name for p in (staging / "new").iterdir())
            (staging / COMPLETE_MARK).write_text(json.dumps({"published": names}))
        except file_errors() as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise write_failed(self.path, err, "the earlier outputs and the last checkpoint are kept; free "
                                               "some space and run again (with --resume if a checkpoint is "
                                               "there).") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        with stop_signals_held():
            self._move_into_place(staging)

    def _move_into_place(self, staging):
        """Move a complete staging folder's files into place and the replaced ones into it, then
        delete it. Safe to repeat after a kill: what was moved is no longer staged."""
        names = json.loads((staging / COMPLETE_MARK).read_text())["published"]
        replaced = staging / "replaced"
        replaced.mkdir(exist_ok=True)
        for name in [*names, *(set(self.published()) - set(names))]:
            target, item = self.path / name, staging / "new" / name
            if name in names and not item.exists():
                continue  # moved before a kill
            if target.exists() or target.is_symlink():
                os.replace(target, replaced / name)
            if name in names:
                os.replace(item, target)
        write_atomically(self.path / OWNER_FILE, lambda tmp: write_json(tmp, {"published": names}))
        shutil.rmtree(staging)


def remove_stale_temporaries(folder):
    """Delete the temporaries of write_atomically in `folder`, where a lock shows no live writer."""
    for entry in Path(folder).glob(".*.tmp-*"):
        if TEMPORARY.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
