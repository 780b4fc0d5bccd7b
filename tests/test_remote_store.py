"""Token stores in object storage, against a real S3 server on 127.0.0.1 (moto's server mode,
tests/s3_server.py), through the real CLI in subprocesses.

What the tests show:
  tokenize + verify   `mm tokenize ... --out s3://mmtokens/tokens.zarr`, then `mm verify` on the URL:
                      exit 0, and every object byte-identical to a local `mm tokenize` of the same input
  same losses         `mm train --data s3://...` for 30 fp32 steps == the same run on the local store
                      (and no credential in any file of the run directory), and `mm eval --data`
                      on the URL gives the local store's val loss,
                      row for row of train_log.tsv (and val_log.tsv); with 2 processes (each rank
                      fetching its own windows' chunks) == 2 processes on the local store
  cache bound         a store of many small chunks read with data.cache_gb far below its size: the
                      cache directory stays under the bound, and the losses are still the local run's
  server stopped      mid-run: retries, then exit 1 with one line naming the URL and a checkpoint;
                      server back: `mm train` resumes and ends on the uninterrupted run's curve
  upload killed       halfway (SIGKILL): no part looks complete to a reader; rerunning completes it,
                      byte-identical again
  damaged chunk       a chunk whose bytes differ from its recorded sha256 is refetched once, then refused;
                      a transfer garbled once (by a proxy) is healed by the second fetch
  no extra / errors   a missing object or bucket is one line naming the URL
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, assert_user_error, mm, mm_env
from s3_server import S3Server, free_port

pytest.importorskip("obstore", reason="the cloud extra (pip install 'mm[cloud]')")
pytest.importorskip("moto.server", reason="moto[server] (the test extra)")

BUCKET = "mmtokens"
URL = f"s3://{BUCKET}/tokens.zarr"
TRAIN = ["train.seq_len=32", "train.max_steps=30", "train.micro_batch_size=4", "train.dtype=fp32",
         "train.lr=3e-3", "train.warmup_steps=5", "train.eval_interval=10", "train.eval_batches=2",
         "train.save_interval=10", "train.log_interval=10", "train.seed=1234"]


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    server.make_bucket(BUCKET)
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())  # for the reader opened in this process
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.close()


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_store) -> Path:
    """A small corpus (the first 400 documents of the tiny one) and a tiny model.json."""
    root = tmp_path_factory.mktemp("remote")
    lines = tiny_store.corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:400]
    (root / "corpus.jsonl").write_text("".join(lines), encoding="utf-8")
    r = mm("config", "--tokenizer", tiny_store.tokenizer, "--out", root / "model.json",
           "--set", "model.dim=64", "--set", "model.n_layers=2")
    assert r.returncode == 0, r.stderr
    return root


def env_for(s3, work: Path, **extra) -> dict:
    return mm_env(**s3.env(), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)


def sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stores(s3, work, tiny_store) -> dict:
    """The corpus tokenized twice by `mm tokenize`: into a local store and into s3://mmtokens/tokens.zarr."""
    env = env_for(s3, work)
    common = ["--source", "sample", "--tokenizer", tiny_store.tokenizer, "--workers", "1"]
    local = mm("tokenize", work / "corpus.jsonl", *common, "--out", work / "local.zarr", env=env)
    remote = mm("tokenize", work / "corpus.jsonl", *common, "--out", URL, env=env)
    assert local.returncode == 0, local.stderr
    assert remote.returncode == 0, remote.stderr
    return {"local": work / "local.zarr", "remote": URL, "stdout": remote.stdout}


def test_tokenize_to_s3_is_byte_identical_and_verifies(s3, work, stores):
    remote = {k.removeprefix("tokens.zarr/"): v for k, v in s3.objects(BUCKET, "tokens.zarr/").items()}
    local = tree(stores["local"])
    assert sorted(remote) == sorted(local)  # no lock or temporary object left behind
    assert remote == local
    assert "sample/part-00000-of-00001/train/tokens/c/0" in remote
    r = mm("verify", URL, env=env_for(s3, work))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "BAD" not in r.stdout and "sha256 matching" in r.stdout


def test_second_writer_of_a_part_is_refused(s3, work, stores, tiny_store):
    """A lock object held by a live process of another host: refused, naming host and PID."""
    lock = "tokens.zarr/sample/.part-00000-of-00001.lock"
    s3.client().put_object(Bucket=BUCKET, Key=lock, Body=b'{"host": "node-7", "pid": 4242, "since": "now"}')
    try:
        r = mm("tokenize", work / "corpus.jsonl", "--source", "sample", "--tokenizer", tiny_store.tokenizer,
               "--workers", "1", "--out", URL, "--force", env=env_for(s3, work))
        assert_user_error(r, f"{URL}/sample/part-00000-of-00001", "process 4242 on node-7", lock.split("/")[-1])
    finally:
        s3.client().delete_object(Bucket=BUCKET, Key=lock)


def train(s3, work: Path, tiny_store, data: str, out: Path, *extra: str, env_extra: dict | None = None,
          wait: bool = True, procs: int = 0):
    launch = ["--procs", str(procs), "--master-port", str(free_port())] if procs else []
    args = [sys.executable, "-m", "stages.cli", "train", "--data", str(data), "--tokenizer",
            str(tiny_store.tokenizer), "--model", str(work / "model.json"), "--device", "cpu", *launch,
            *sets(f"train.out_dir={out}", f"data.cache_dir={work / 'cache'}", *TRAIN, *extra)]
    proc = subprocess.Popen(args, cwd=REPO, env=env_for(s3, work, **(env_extra or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out_text, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return proc


def log_rows(out: Path, name: str = "train_log.tsv") -> list[list[str]]:
    """Rows of a metrics TSV as exact strings, without the columns that measure time."""
    lines = (out / name).read_text().splitlines()
    header = lines[0].split("\t")
    keep = [i for i, c in enumerate(header) if c not in ("tokens_per_s", "data_s", "step_s", "mfu", "elapsed_s")]
    return [[line.split("\t")[i] for i in keep] for line in lines[1:] if line]


@pytest.fixture(scope="module")
def local_run(s3, work, tiny_store, stores) -> Path:
    out = work / "run_local"
    train(s3, work, tiny_store, str(stores["local"]), out)
    return out


def test_training_on_s3_equals_the_local_store(s3, work, tiny_store, stores, local_run):
    out = work / "run_s3"
    train(s3, work, tiny_store, URL, out)
    assert len(log_rows(out)) == 30
    assert log_rows(out) == log_rows(local_run)
    assert log_rows(out, "val_log.tsv") == log_rows(local_run, "val_log.tsv")
    assert any((work / "cache").iterdir())  # it did read through the cache
    evals = {}
    for name, data in (("local", stores["local"]), ("s3", URL)):  # mm eval --data URL scores the same windows
        r = mm("eval", out / "ckpt.pth", "--data", data, "--out", work / f"eval_{name}.json", "--seq-len", "32",
               *sets(f"data.cache_dir={work / 'cache'}"), env=env_for(s3, work))
        assert r.returncode == 0, r.stderr[-3000:]
        evals[name] = json.loads((work / f"eval_{name}.json").read_text())
    assert evals["s3"]["val_loss"] == evals["local"]["val_loss"] and evals["s3"]["data"] == URL
    secrets = [s3.env()["AWS_SECRET_ACCESS_KEY"].encode(), s3.env()["AWS_ACCESS_KEY_ID"].encode()]
    written = [p for p in out.rglob("*") if p.is_file()]  # logs, metrics.json, checkpoints
    assert any(p.name == "metrics.json" for p in written) and any(p.suffix == ".pth" for p in written)
    assert not [p for p in written for secret in secrets if secret in p.read_bytes()]



# ---------------------------------------------------------------------------
# A store of many small chunks, read through a cache far smaller than it
# ---------------------------------------------------------------------------

SMALL = f"s3://{BUCKET}/small.zarr"
CACHE_GB = 2e-5  # 20 KB: about 40 of the small store's 512-byte token chunks, out of ~190


@pytest.fixture(scope="module")
def small_store(s3, work, tiny_store, stores) -> str:
    """The same corpus in chunks of 256 tokens, uploaded by the in-process writer (tokenize_files to a URL)."""
    from pipeline.data.tokenize import tokenize_files

    tokenize_files([work / "corpus.jsonl"], tiny_store.tokenizer, SMALL, source="sample", val_fraction=0.02,
                   progress=False, chunk_tokens=256)
    return SMALL


def cache_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if not f.name.startswith("."))


def test_cache_stays_under_its_bound_and_losses_match(s3, work, tiny_store, small_store, local_run):
    from pipeline.data.store.reader import open_store

    chunks = [k for k in s3.keys(BUCKET, "small.zarr/sample/") if "/train/tokens/c/" in k]
    assert len(chunks) * 512 > 4 * CACHE_GB * 1e9  # the store is several times the cache
    assert open_store(SMALL).fingerprint == open_store(URL).fingerprint  # chunked differently, the same data
    out, cache = work / "run_small", work / "cache_small"
    train(s3, work, tiny_store, SMALL, out, f"data.cache_gb={CACHE_GB}", f"data.cache_dir={cache}")
    assert 0 < cache_bytes(cache) <= CACHE_GB * 1e9
    assert log_rows(out) == log_rows(local_run)


def test_two_processes_on_s3_equal_two_on_the_local_store(s3, work, tiny_store, stores, small_store):
    """Each rank fetches its own windows' chunks (the small-chunk store, a cache per run)."""
    local, remote = work / "run_local_2p", work / "run_s3_2p"
    train(s3, work, tiny_store, str(stores["local"]), local, "train.accumulation_steps=2", procs=2)
    train(s3, work, tiny_store, SMALL, remote, "train.accumulation_steps=2", f"data.cache_dir={work / 'cache_2p'}",
          procs=2)
    assert len(log_rows(remote)) == 30
    assert log_rows(remote) == log_rows(local)


def test_server_stopped_mid_run_stops_cleanly_then_resumes_the_same_curve(s3, work, tiny_store, small_store,
                                                                          local_run):
    out, cache = work / "run_outage", work / "cache_outage"
    extra = (f"data.cache_gb={CACHE_GB}", f"data.cache_dir={cache}", "train.log_interval=1")
    proc = train(s3, work, tiny_store, SMALL, out, *extra, wait=False)
    try:
        deadline = time.time() + 300
        while not ((out / "train_log.tsv").is_file() and len(log_rows(out)) >= 12):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        s3.stop()
        _, err = proc.communicate(timeout=300)
    finally:
        if s3.server is None:
            s3.start()
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and SMALL in lines[0] and "unreachable" in lines[0], err[-3000:]
    assert "after 6 retries" in lines[0] and "rerun to resume" in lines[0], lines[0]  # backoff, then a clean stop
    saved = sorted(out.glob("step_*.pth"))
    assert saved and int(saved[-1].stem.split("_")[1]) >= 12  # the last finished step, not only step 10
    train(s3, work, tiny_store, SMALL, out, *extra)
    assert log_rows(out) == log_rows(local_run)


# ---------------------------------------------------------------------------
# Upload interrupted; damaged chunks; errors
# ---------------------------------------------------------------------------

WRITE = """
import sys
import time
from pipeline.data.tokenize import tokenize_files
tokenize_files([sys.argv[1]], sys.argv[2], sys.argv[3], source="sample", val_fraction=0.02, progress=False,
               chunk_tokens=2048)
"""


def test_upload_killed_halfway_leaves_no_part_and_a_rerun_completes_it(s3, work, tiny_store):
    from pipeline.data.store.reader import open_store
    from pipeline.data.tokenize import tokenize_files
    from pipeline.errors import UserError

    slow = S3Server(latency_s=0.05).start()  # the same objects (moto's state is per process), each request slower
    url, part = f"s3://{BUCKET}/killed.zarr", "killed.zarr/sample/part-00000-of-00001/"
    args = [sys.executable, "-c", WRITE, str(work / "corpus.jsonl"), str(tiny_store.tokenizer), url]
    env = mm_env(**slow.env(), XDG_CACHE_HOME=str(work / "xdg"))
    try:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while len(s3.keys(BUCKET, part)) < 10:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        uploaded = s3.keys(BUCKET, part)
        assert part + "zarr.json" not in uploaded and len(uploaded) >= 10
        with pytest.raises(UserError, match="no finished part"):
            open_store(url)
        r = mm("verify", url, env=env_for(s3, work))
        assert r.returncode == 1 and "BAD" in r.stdout, r.stdout + r.stderr
        rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]  # the dead writer's lock was taken over
    finally:
        slow.close()
    tokenize_files([work / "corpus.jsonl"], tiny_store.tokenizer, work / "killed.zarr", source="sample",
                   val_fraction=0.02, progress=False, chunk_tokens=2048)
    remote = {k.removeprefix("killed.zarr/"): v for k, v in s3.objects(BUCKET, "killed.zarr/").items()}
    assert remote == tree(work / "killed.zarr")  # complete, byte-identical, no lock left
    assert mm("verify", url, env=env_for(s3, work)).returncode == 0


def test_a_damaged_chunk_is_refused_naming_it(s3, work, tiny_store, stores):
    from pipeline.data.store import cache
    from pipeline.data.store.reader import open_store
    from pipeline.errors import UserError

    c = s3.client()
    for key in s3.keys(BUCKET, "tokens.zarr/"):  # a copy of the store with one chunk's bytes altered
        c.copy_object(Bucket=BUCKET, Key=key.replace("tokens.zarr/", "damaged.zarr/", 1),
                      CopySource={"Bucket": BUCKET, "Key": key})
    chunk = "damaged.zarr/sample/part-00000-of-00001/train/tokens/c/0"
    data = bytearray(c.get_object(Bucket=BUCKET, Key=chunk)["Body"].read())
    data[100] ^= 1
    c.put_object(Bucket=BUCKET, Key=chunk, Body=bytes(data))
    cache.configure(work / "cache_damaged", 1.0)
    store = open_store(f"s3://{BUCKET}/damaged.zarr")  # opening reads metadata and sizes only
    with pytest.raises(UserError, match=r"s3://mmtokens/damaged.zarr/sample/.*/train/tokens/c/0: sha256 differs"):
        store.train.tokens[0:10]
    recorded = store.sources["sample"].parts[0].attrs["chunk_sha256"]["train/tokens/c/0"]
    kept = list((work / "cache_damaged").iterdir())  # the doc offsets opening read, and not the damaged chunk
    assert kept and recorded not in {f.name for f in kept}
    assert all(hashlib.sha256(f.read_bytes()).hexdigest() == f.name for f in kept)
    r = mm("verify", f"s3://{BUCKET}/damaged.zarr", env=env_for(s3, work))
    assert_user_error(r, "train/tokens/c/0", "sha256 differs", alone=False)
    c.delete_object(Bucket=BUCKET, Key=chunk)
    r = mm("verify", f"s3://{BUCKET}/damaged.zarr", env=env_for(s3, work))
    assert_user_error(r, f"s3://{BUCKET}/{chunk}: chunk file missing", alone=False)


def test_a_chunk_garbled_in_transit_is_fetched_again(s3, work, stores):
    from pipeline.data.store import cache
    from pipeline.data.store.reader import open_store

    c = s3.client()
    for key in s3.keys(BUCKET, "tokens.zarr/"):
        c.copy_object(Bucket=BUCKET, Key=key.replace("tokens.zarr/", "garbled.zarr/", 1),
                      CopySource={"Bucket": BUCKET, "Key": key})
    proxied = S3Server(latency_s=0.001).start()  # the same objects, through a proxy that garbles one transfer
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = proxied.endpoint  # for the client of this new URL
    try:
        cache.configure(work / "cache_garbled", 1.0)
        store = open_store(f"s3://{BUCKET}/garbled.zarr")
        proxied.proxy.garble = "garbled.zarr/sample/part-00000-of-00001/train/tokens/c/0"
        got = store.train.tokens[0:1000]
        assert proxied.proxy.garbled == 1  # the first transfer was garbled; the second one was used
        assert (got == open_store(stores["local"]).train.tokens[0:1000]).all()
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
        proxied.close()


@pytest.mark.parametrize("url, needle", [
    (f"s3://{BUCKET}/absent.zarr", "token store not found"),
    ("s3://no-such-bucket/tokens.zarr", "s3://no-such-bucket/tokens.zarr"),
])
def test_a_missing_store_or_bucket_is_one_line_naming_the_url(s3, work, tiny_store, url, needle):
    r = mm("train", "--data", url, "--tokenizer", tiny_store.tokenizer, "--model", work / "model.json",
           *sets(f"train.out_dir={work / 'run_missing'}"), env=env_for(s3, work))
    assert_user_error(r, url, needle)


def test_without_the_cloud_extra_a_url_names_the_extra(s3, work, tmp_path):
    (tmp_path / "obstore.py").write_text("raise ImportError('obstore is not installed')\n")
    env = env_for(s3, work)
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    r = mm("verify", URL, env=env)
    assert_user_error(r, URL, "pip install 'mm[cloud]'")
