"""The compute thread: rounds asked for off the main thread run on one thread, whichever threads ask."""

import logging
import threading

import pytest

from eagle2.compute import ComputeThread, shared

from conftest import make_generator, make_tiny_model


def test_calls_run_on_the_compute_thread_in_order_with_their_errors():
    ct = ComputeThread(name="test-compute")
    here = threading.current_thread()
    ran_on = ct.run(threading.current_thread)
    assert ran_on is not here and ran_on.name == "test-compute" and ran_on.daemon
    assert ct.run(lambda a, b=0: a + b, 2, b=3) == 5
    assert ct.run(lambda: ct.run(threading.current_thread)) is ran_on  # a call from inside runs inline
    with pytest.raises(KeyError, match="missing"):
        ct.run(lambda: {}["missing"])
    assert ct.run(threading.current_thread) is ran_on and not ct.busy()  # an error leaves it serving
    order = []

    def caller(i):
        for k in range(20):
            ct.run(lambda: order.append((i, k)))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(order) == [(i, k) for i in range(4) for k in range(20)]
    assert all([k for j, k in order if j == i] == list(range(20)) for i in range(4))  # each caller's in order


def _record_forward_threads(gen) -> set:
    seen: set = set()
    forward = gen.target.forward

    def recording(*args, **kwargs):
        seen.add(threading.current_thread())
        return forward(*args, **kwargs)

    gen.target.forward = recording  # the engine calls the target's forward for prefill and every round
    return seen


def _in_threads(*calls):
    """Run each call on a thread of its own, all at once: their results, in order (errors re-raised)."""
    out: dict = {}

    def run(i, call):
        try:
            out[i] = call()
        except BaseException as e:  # noqa: BLE001 (raised below)
            out[i] = e

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(calls)):
        if isinstance(out[i], BaseException):
            raise out[i]
    return [out[i] for i in range(len(calls))]


def test_rounds_asked_for_off_the_main_thread_run_on_the_compute_thread(caplog):
    """Generations from several threads at once (streams left midway among them) get what each gets
    alone, and every target forward runs on the compute thread, without a warning. The main thread's
    rounds run on the main thread; doing both warns once (two OpenMP pools)."""
    ct = ComputeThread(name="test-compute")
    [gen] = _in_threads(lambda: make_generator(
        make_tiny_model("llama", vocab_size=16, max_position_embeddings=96), compute=ct))  # that thread exits
    seen = _record_forward_threads(gen)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    [alone] = _in_threads(lambda: [gen.generate(p, max_new_tokens=24, method="vanilla").token_ids for p in prompts])

    def left_early_then_whole(i, method):
        stream = gen.stream(prompts[i], max_new_tokens=24, method=method)
        next(stream, None)
        stream.close()  # its rounds are closed on the compute thread too (the engine's cleanup)
        return gen.generate(prompts[i], max_new_tokens=24, method=method).token_ids

    with caplog.at_level(logging.WARNING, logger="eagle2"):
        for _ in range(2):
            assert _in_threads(*(lambda i=i, m=m: left_early_then_whole(i, m)
                                 for i, m in enumerate(("eagle2", "chain", "vanilla")))) == alone
        _in_threads(gen.clear_cache)
        assert seen == {ct._thread} and "second thread" not in caplog.text
        assert gen.generate(prompts[0], max_new_tokens=24).token_ids == alone[0]
    assert seen == {ct._thread, threading.main_thread()}
    assert caplog.text.count("second thread") == 1


def test_load_leaves_no_pool_and_serves_other_threads_on_the_shared_compute_thread(monkeypatch, tmp_path,
                                                                                   smol_tokenizer):
    """eagle2.load loads on a thread that exits and gives the generator the process's compute thread;
    a failed load raises its own error in the caller."""
    import warnings

    import eagle2
    from eagle2 import api

    make_tiny_model("llama", vocab_size=len(smol_tokenizer)).save_pretrained(tmp_path / "llama")
    smol_tokenizer.save_pretrained(tmp_path / "llama")
    loaded_on = []
    load_target = api.load_target

    def recording_load(*args, **kwargs):
        loaded_on.append(threading.current_thread())
        return load_target(*args, **kwargs)

    monkeypatch.setattr(api, "load_target", recording_load)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no trained head: a fresh one, with its own warning
        gen = eagle2.load(str(tmp_path / "llama"))
    assert loaded_on[0] is not threading.current_thread() and not loaded_on[0].is_alive()
    assert gen._compute is shared()
    seen = _record_forward_threads(gen)
    _in_threads(lambda: gen.generate("Hi", max_new_tokens=4))
    assert seen == {shared()._thread}

    def failing_load(*args, **kwargs):
        raise ValueError("cannot read this model")

    monkeypatch.setattr(api, "load_target", failing_load)
    with pytest.raises(ValueError, match="^cannot read this model$"):
        eagle2.load(str(tmp_path / "llama"))


def test_a_load_interrupted_by_ctrl_c_still_counts_as_loading():
    """Ctrl-C stops the wait for a load, not the load: until the load ends, ``loading()`` says so (the CLI
    then exits at once). Read from ``Thread.is_alive()`` it said no: on Python < 3.13 a ``join`` that a
    signal interrupts marks the joined thread stopped while it runs (CPython gh-90882), and a process that
    exited normally with the load still inside torch aborted ("terminate called without an active exception")."""
    import signal
    import time

    from eagle2.api import load_off_thread, loading

    release = threading.Event()
    main = threading.get_ident()
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores it)
    try:
        threading.Timer(0.3, lambda: signal.pthread_kill(main, signal.SIGINT)).start()  # a real signal, as Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            load_off_thread(lambda: release.wait(10))
    finally:
        signal.signal(signal.SIGINT, before)
    assert loading()  # the load runs on
    release.set()
    t0 = time.perf_counter()
    while loading() and time.perf_counter() - t0 < 5:
        time.sleep(0.01)
    assert not loading()
    assert load_off_thread(lambda: 7) == 7 and not loading()


def test_a_cached_build_loads_without_the_compile_lock(tmp_path):
    """A built extension is imported as it is, even beside a lock file (a process killed while holding
    cpp_extension's lock left one, and every later load waited on it forever); a stale lock is dropped
    before a compile, a fresh one (a compile under way) is not."""
    import os
    import time
    from pathlib import Path

    from eagle2 import native

    module = native.load()
    if module is None:
        pytest.skip("native extension unavailable")
    so = Path(module.__file__)
    (so.parent / "lock").touch()
    try:
        again = native._import_built(so.stem.split(".")[0], so.parent)
        assert again is not None and hasattr(again, "decoder_forward_multi")
    finally:
        (so.parent / "lock").unlink()
    assert native._import_built("eagle2_lean_none", tmp_path) is None
    old, fresh = tmp_path / "old", tmp_path / "fresh"
    old.touch()
    fresh.touch()
    os.utime(old, (time.time() - 2 * native.LOCK_STALE_S,) * 2)
    native._drop_stale_lock(old)
    native._drop_stale_lock(fresh)
    native._drop_stale_lock(tmp_path / "absent")
    assert not old.exists() and fresh.exists()


def test_import_waits_for_torch_until_a_name_is_used():
    """``import eagle2`` (and the CLI's parsing, ``eagle2 --help``) does not import torch; the first use of
    a name does."""
    import subprocess
    import sys

    code = ("import sys, eagle2\nassert 'torch' not in sys.modules and 'load' in dir(eagle2)\n"
            "from eagle2 import TreeConfig\nassert 'torch' not in sys.modules\n"
            "eagle2.load\nassert 'torch' in sys.modules\n"
            "try:\n    eagle2.nothing\nexcept AttributeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "module 'eagle2' has no attribute 'nothing'"


def test_ctrl_c_while_the_cli_starts_is_one_line():
    """Ctrl-C early in ``eagle2 generate`` (importing torch, or loading) ends with "interrupted" and exit
    code 130, never a traceback."""
    import signal
    import subprocess
    import sys
    import time

    for delay in (0.2, 0.8):
        p = subprocess.Popen([sys.executable, "-c", "import sys; from eagle2.cli import main; sys.exit(main())",
                              "generate", "--max-new-tokens", "4", "hi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 130 and "Traceback" not in err and err.strip().endswith("interrupted"), (delay, err)
