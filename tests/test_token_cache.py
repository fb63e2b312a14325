import json

import numpy as np
import pytest

import gpt_train as gt
import token_cache as tc
from gptkit.data import cache as cache_mod
from gptkit.data import smollm


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over a lazy dog while seven wizards box jovially".split()
    return [f"Document {i}: " + " ".join(rng.choice(words, size=int(rng.integers(20, 200)))) for i in range(n)]


@pytest.fixture
def corpora(tmp_path):
    """The same documents as .jsonl (column text), .parquet (column body) and .txt files."""
    import pandas as pd

    docs = _docs(400)
    (tmp_path / "j").mkdir()
    with open(tmp_path / "j" / "part.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "meta": 1}) + "\n")
    (tmp_path / "p").mkdir()
    pd.DataFrame({"body": docs}).to_parquet(tmp_path / "p" / "part.parquet")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "combined_1.txt").write_text("<|endoftext|>".join(docs[:200]))
    (tmp_path / "t" / "combined_2.txt").write_text("<|endoftext|>".join(docs[200:]))
    return tmp_path, docs


def interrupted_build(monkeypatch, src, cache_dir, kw, at_shard: int, torn_temp: bool = False) -> None:
    """A cache build interrupted (Ctrl-C) as it starts writing shard number `at_shard`, optionally
    leaving a torn temp file of that shard, as a kill mid-write would."""
    real, calls = cache_mod._write_shard, {"n": 0}

    def stop(path, tokens):
        calls["n"] += 1
        if calls["n"] == at_shard:
            if torn_temp:
                path.with_name(f".{path.name}.tmp").write_bytes(tokens.tobytes()[:10])
            raise KeyboardInterrupt
        real(path, tokens)

    monkeypatch.setattr(cache_mod, "_write_shard", stop)
    with pytest.raises(KeyboardInterrupt):
        tc.build_cache(src, cache_dir, **kw)
    monkeypatch.setattr(cache_mod, "_write_shard", real)


@pytest.mark.parametrize("kind,column", [("j", "text"), ("p", "body"), ("t", "text")])
def test_cache_matches_direct_tokenization(corpora, kind, column):
    root, docs = corpora
    src = tc.resolve_source(str(root / kind), text_column=column)
    m = tc.build_cache(src, root / f"cache_{kind}", val_fraction=0.25, shard_tokens=3000, progress=False, log=print)
    direct = gt.encode_documents(docs)
    assert m["complete"] and m["documents"] == 400
    assert m["train_tokens"] + m["val_tokens"] == len(direct) == m["tokens_consumed"]
    assert m["tokenizer"] == "gpt2" and m["tokenizer_hash"] == gt.tokenizer_fingerprint()
    assert m["carry"] is None and not list((root / f"cache_{kind}").glob("carry_*"))  # nothing left over
    cache = tc.load_cache(root / f"cache_{kind}", src)
    assert all(isinstance(a, np.memmap) and a.dtype == np.uint16 for a in cache.train + cache.val)
    assert [len(a) for a in cache.train] == [s["tokens"] for s in m["shards"]["train"]]
    assert all(len(a) == 3000 for a in cache.train[:-1])
    # Val is every 4th block of 4096 tokens, train the rest: together, in order, the direct stream.
    train, val = np.concatenate(cache.train), np.concatenate(cache.val)
    B = tc.VAL_BLOCK_TOKENS
    blocks = [direct[i : i + B] for i in range(0, len(direct), B)]
    assert np.array_equal(val, np.concatenate(blocks[0::4]))
    assert np.array_equal(train, np.concatenate([b for i, b in enumerate(blocks) if i % 4]))
    assert set(json.loads((root / f"cache_{kind}" / "manifest.json").read_text())) >= {
        "source", "tokenizer_hash", "shards", "documents", "train_tokens", "val_tokens"}


def test_max_tokens_caps_the_stream(corpora):
    import threading

    root, _ = corpora
    src = tc.resolve_source(str(root / "j"))
    m = tc.build_cache(src, root / "c", max_tokens=10000, shard_tokens=4000, val_fraction=0.5, progress=False,
                       batch_docs=16)
    assert m["tokens_consumed"] == 10000 == m["train_tokens"] + m["val_tokens"]
    assert m["rows_read"] < 400  # the stream was not read to its end...
    readers = [t for t in threading.enumerate() if t.name == "token-cache-reader"]
    for t in readers:  # ...and its reader thread has stopped
        t.join(timeout=60)  # stops within 0.1 s of the close; the bound only keeps a regression from hanging
    assert not any(t.is_alive() for t in readers)
    with pytest.raises(gt.UserError, match="max_tokens=10000, this run asks for 20000"):
        tc.build_cache(src, root / "c", max_tokens=20000, val_fraction=0.5, progress=False)


def test_interrupted_build_resumes_to_an_identical_cache(corpora, monkeypatch):
    root, _ = corpora
    src = tc.resolve_source(str(root / "j"))
    kw = dict(val_fraction=0.25, shard_tokens=2000, batch_docs=16, progress=False)
    tc.build_cache(src, root / "full", **kw)
    interrupted_build(monkeypatch, src, root / "part", kw, at_shard=4, torn_temp=True)
    m = json.loads((root / "part" / "manifest.json").read_text())
    assert not m["complete"] and m["shards_written"] == 3
    with pytest.raises(gt.UserError, match="incomplete"):
        tc.load_cache(root / "part")
    logs = []
    tc.build_cache(src, root / "part", **kw, log=logs.append)
    assert any("resuming" in line for line in logs)
    full = {p.name: p.read_bytes() for p in (root / "full").iterdir()}
    part = {p.name: p.read_bytes() for p in (root / "part").iterdir()}  # the torn temp file is gone too
    assert full.keys() == part.keys()
    assert all(full[k] == part[k] for k in full)


def test_cache_from_other_source_or_tokenizer_is_refused(corpora):
    root, _ = corpora
    src = tc.resolve_source(str(root / "j"))
    tc.build_cache(src, root / "c", progress=False, val_fraction=0.25)
    other = tc.resolve_source(str(root / "t"))
    with pytest.raises(gt.UserError, match="was built from .* not from"):
        tc.build_cache(other, root / "c", progress=False, val_fraction=0.25)
    m = json.loads((root / "c" / "manifest.json").read_text())
    m["tokenizer_hash"] = "0123456789abcdef"
    (root / "c" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(gt.UserError, match="another tokenizer"):
        tc.load_cache(root / "c", src)


def test_truncated_shard_is_named(corpora):
    root, _ = corpora
    src = tc.resolve_source(str(root / "j"))
    m = tc.build_cache(src, root / "c", progress=False, shard_tokens=3000, val_fraction=0.25)
    victim = root / "c" / m["shards"]["train"][1]["name"]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(gt.UserError, match=f"shard .*{victim.name} is truncated or corrupt: 100 bytes"):
        tc.load_cache(root / "c", src)


def test_clear_errors_for_bad_sources(corpora, tmp_path):
    root, _ = corpora
    with pytest.raises(gt.UserError, match="no text column 'content'.*--text_column"):
        tc.build_cache(tc.resolve_source(str(root / "j"), text_column="content"), tmp_path / "x", progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(gt.UserError, match="empty"):
        tc.build_cache(tc.resolve_source(str(empty)), tmp_path / "y", progress=False)
    with pytest.raises(gt.UserError, match="no subset 'cosmo'"):
        tc.resolve_source("smollm:cosmo")
    with pytest.raises(gt.UserError, match="python-edu.*blob ids"):
        tc.resolve_source("smollm:python-edu")
    with pytest.raises(gt.UserError, match="missing.jsonl: no such file or folder"):
        tc.resolve_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(gt.UserError, match="one positive weight per subset"):
        tc.resolve_source("smollm:cosmopedia-v2,fineweb-edu-dedup", data_mix="1")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello")
    with pytest.raises(gt.UserError, match="too few for a training split"):
        tc.build_cache(tc.resolve_source(str(tiny)), tmp_path / "z", progress=False)


def test_hub_offline_is_a_one_line_error(tmp_path):
    with pytest.raises(gt.UserError, match="could not stream HuggingFaceTB/smollm-corpus/cosmopedia-v2.*local"):
        tc.build_cache(tc.resolve_source("smollm:cosmopedia-v2"), tmp_path / "c", progress=False)


def test_hub_mix_path_with_local_streams(tmp_path, monkeypatch):
    """The real streaming code (column selection, interleaving, max_tokens) on local stand-ins for the hub."""
    from datasets import load_dataset

    files = {}
    for name, prefix, extra in (("cosmopedia-v2", "COSMO", {"prompt": "p", "audience": "a"}),
                                ("fineweb-edu-dedup", "FINE", {"id": "x", "metadata": {"score": 3}})):
        path = tmp_path / f"{name}.jsonl"
        with open(path, "w") as f:
            for i in range(500):
                f.write(json.dumps({"text": f"{prefix} {i} " + "words " * 30, **extra}) + "\n")
        files[name] = path
    monkeypatch.setattr(smollm, "open_hub_subset",
                        lambda s: load_dataset("json", data_files=str(files[s]), split="train", streaming=True))
    src = tc.resolve_source("smollm:cosmopedia-v2,fineweb-edu-dedup", data_mix="3,1")
    assert src.weights == [0.75, 0.25]
    def first_400():
        from gptkit.data.sources import Mixer

        mixer = Mixer(src, [0, 0], [0, 0], batch_docs=100)
        try:
            docs = [gt.get_tokenizer().decode(mixer.next()[1][:-1].tolist()) for _ in range(400)]
        finally:
            mixer.close()
        return [d.split()[0] for d in docs]

    docs = first_400()
    share = docs.count("COSMO") / len(docs)
    assert len(docs) == 400 and 0.65 < share < 0.85
    assert docs == first_400()  # seeded: reproducible
    m = tc.build_cache(src, tmp_path / "c", max_tokens=12000, val_fraction=0.25, progress=False)
    assert m["tokens_consumed"] == 12000 and m["source"]["kind"] == "hub"
    cache = tc.load_cache(tmp_path / "c", src)
    assert sum(map(len, cache.train)) + sum(map(len, cache.val)) == 12000


def test_sampler_deterministic_rank_disjoint_and_resumable(corpora):
    root, _ = corpora
    src = tc.resolve_source(str(root / "j"))
    tc.build_cache(src, root / "c", progress=False, shard_tokens=3000, val_fraction=0.25)
    cache = tc.load_cache(root / "c", src)
    ds = gt.TokenWindowDataset(cache.train, context_length=32)

    def windows(sampler, n):
        return [tuple(map(tuple, sampler.next()[0].tolist())) for _ in range(n)]

    a, b = gt.BatchSampler(ds, 4, seed=3), gt.BatchSampler(ds, 4, seed=3)
    assert windows(a, 10) == windows(b, 10)
    r0, r1 = gt.BatchSampler(ds, 4, seed=3, rank=0, world_size=2), gt.BatchSampler(ds, 4, seed=3, rank=1, world_size=2)
    w0, w1 = windows(r0, 8), windows(r1, 8)
    flat0 = {w for batch in w0 for w in batch}
    flat1 = {w for batch in w1 for w in batch}
    assert not flat0 & flat1  # disjoint across ranks
    single = windows(gt.BatchSampler(ds, 4, seed=3), 16)
    assert single[0::2] == w0 and single[1::2] == w1  # rank r takes global batch 2k + r
    c = gt.BatchSampler(ds, 4, seed=3)
    windows(c, 5)
    state = c.state_dict()
    expected = windows(c, 5)
    d = gt.BatchSampler(ds, 4, seed=3)
    d.load_state_dict(state)
    assert windows(d, 5) == expected
    # Inputs and targets are the same window shifted by one token.
    x, y = gt.BatchSampler(ds, 2, seed=0).next()
    assert np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())


@pytest.fixture
def snapshot(tmp_path):
    """A local smollm-corpus snapshot in miniature: one folder per subset, parquet files whose
    columns differ (cosmopedia-v2 has prompt/audience/..., fineweb-edu-dedup has id and a nested
    metadata struct), documents of different lengths in each."""
    import pandas as pd

    rng = np.random.default_rng(4)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    root = tmp_path / "smollm"
    (root / "cosmopedia-v2").mkdir(parents=True)
    (root / "fineweb-edu-dedup").mkdir()
    for i in range(2):
        docs = [f"Cosmo {i}-{j} " + " ".join(rng.choice(words, size=int(rng.integers(40, 160)))) for j in range(150)]
        pd.DataFrame({"prompt": ["p"] * 150, "text": docs, "token_length": [1] * 150, "audience": ["a"] * 150,
                      "format": ["f"] * 150, "seed_data": ["s"] * 150}).to_parquet(
            root / "cosmopedia-v2" / f"train-0000{i}-of-00002.parquet")
    docs = [f"Fine {j} " + " ".join(rng.choice(words, size=int(rng.integers(10, 60)))) for j in range(400)]
    pd.DataFrame({"text": docs, "id": [f"<urn:{j}>" for j in range(400)],
                  "metadata": [{"dump": "CC", "score": 3.1} for _ in range(400)]}).to_parquet(
        root / "fineweb-edu-dedup" / "train-00000-of-00001.parquet")
    return root


def test_local_snapshot_with_mixed_schemas_builds_and_mixes(snapshot, tmp_path):
    whole = tc.resolve_source(str(snapshot))  # a folder of parquet files whose columns differ
    m = tc.build_cache(whole, tmp_path / "all", val_fraction=0.1, progress=False)
    assert m["complete"] and m["rows_read"] == 700
    mix = tc.resolve_source("smollm:cosmopedia-v2,fineweb-edu-dedup", data_mix="0.7,0.3", smollm_dir=str(snapshot))
    m = tc.build_cache(mix, tmp_path / "mix", max_tokens=20_000, val_fraction=0.1, progress=False)
    share = m["tokens_by_part"][0] / sum(m["tokens_by_part"])
    assert sum(m["tokens_by_part"]) == 20_000 and abs(share - 0.7) < 0.01  # by tokens, within 1% of the mix
    assert m["source"]["kind"] == "local" and m["source"]["weights"] == [0.7, 0.3]


def test_hub_and_local_snapshot_give_the_same_cache(snapshot, tmp_path, monkeypatch):
    from datasets import load_dataset

    def from_snapshot(subset):  # the hub's streaming reader, on the same parquet files
        files = sorted(str(p) for p in (snapshot / subset).glob("*.parquet"))
        return load_dataset("parquet", data_files=files, split="train", streaming=True)

    monkeypatch.setattr(smollm, "open_hub_subset", from_snapshot)
    kw = dict(max_tokens=15_000, val_fraction=0.2, shard_tokens=4096, progress=False)
    hub = tc.resolve_source("smollm:cosmopedia-v2,fineweb-edu-dedup", data_mix="0.7,0.3")
    local = tc.resolve_source("smollm:cosmopedia-v2,fineweb-edu-dedup", data_mix="0.7,0.3", smollm_dir=str(snapshot))
    a = tc.build_cache(hub, tmp_path / "hub", **kw)
    b = tc.build_cache(local, tmp_path / "local", **kw)
    assert a["source"]["kind"] == "hub" and b["source"]["kind"] == "local"
    assert a["shards"] == b["shards"]  # the same names, token counts and sha256: the same bytes
    assert a["tokens_by_part"] == b["tokens_by_part"]


def test_a_bad_source_leaves_no_cache_folder(snapshot, tmp_path):
    with pytest.raises(gt.UserError, match=r"train-00000-of-00001.parquet has no text column 'content' \(columns: text"):
        tc.build_cache(tc.resolve_source(str(snapshot / "fineweb-edu-dedup"), text_column="content"), tmp_path / "c",
                       progress=False)
    assert not (tmp_path / "c").exists()


def test_an_interrupted_build_of_changed_data_starts_over(corpora, monkeypatch):
    root, _ = corpora
    src = tc.resolve_source(str(root / "j"))
    kw = dict(val_fraction=0.25, shard_tokens=2000, batch_docs=16, progress=False)
    interrupted_build(monkeypatch, src, root / "c", kw, at_shard=3)
    data = root / "j" / "part.jsonl"
    data.write_text(data.read_text().replace("Document 3:", "Document 9:"))  # same size, other content
    logs = []
    m = tc.build_cache(tc.resolve_source(str(root / "j")), root / "c", **kw, log=logs.append)
    assert any("starting it over" in line and "changed content" in line for line in logs)
    fresh = tc.build_cache(tc.resolve_source(str(root / "j")), root / "fresh", **kw)
    assert m["shards"] == fresh["shards"]
    with pytest.raises(gt.UserError, match="changed content"):  # a complete cache is refused, never removed
        data.write_text(data.read_text().replace("Document 9:", "Document 8:"))
        tc.build_cache(tc.resolve_source(str(root / "j")), root / "c", **kw)
    assert (root / "c" / m["shards"]["train"][0]["name"]).exists()


def test_a_copied_corpus_keeps_its_cache(corpora, tmp_path):
    import shutil

    root, _ = corpora
    src = tc.resolve_source(str(root / "t"))
    m = tc.build_cache(src, root / "t" / ".token_cache", val_fraction=0.25, progress=False)
    shutil.copytree(root / "t", tmp_path / "elsewhere")  # the text and its cache, moved together
    moved = tc.resolve_source(str(tmp_path / "elsewhere"))
    again = tc.load_cache(tmp_path / "elsewhere" / ".token_cache", moved)  # files are known by content, not place
    assert again.manifest["shards"] == m["shards"]
    (tmp_path / "elsewhere" / "combined_2.txt").write_text("other text")
    with pytest.raises(gt.UserError, match="combined_2.txt changed size"):
        tc.load_cache(tmp_path / "elsewhere" / ".token_cache", tc.resolve_source(str(tmp_path / "elsewhere")))


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "cache.lock"}


def test_a_build_killed_right_after_each_record_ends_identical_with_nothing_left(corpora, monkeypatch):
    """Killed just after the manifest of record k is written (before the old carry file is removed),
    for every k in turn: each restart continues, and the last one leaves exactly the uninterrupted
    build's files (the final record's leftover carry included)."""
    root, _ = corpora
    src = tc.resolve_source(str(root / "j"))
    kw = dict(val_fraction=0.25, shard_tokens=2000, batch_docs=16, progress=False, log=lambda *a: None)
    tc.build_cache(src, root / "full", **kw)
    real, seen = cache_mod.write_json, {"n": 0, "kill_at": 1}

    def write_then_die(path, obj):
        out = real(path, obj)
        if path.name == "manifest.json":
            seen["n"] += 1
            if seen["n"] == seen["kill_at"]:
                raise KeyboardInterrupt
        return out

    monkeypatch.setattr(cache_mod, "write_json", write_then_die)
    kills = 0
    while True:
        seen["n"] = 0
        try:
            tc.build_cache(src, root / "part", **kw)
            break
        except KeyboardInterrupt:
            kills += 1
            seen["kill_at"] += 1
    monkeypatch.setattr(cache_mod, "write_json", real)
    tc.build_cache(src, root / "part", **kw)  # a later start on the finished cache
    assert kills > 5
    assert _files(root / "part") == _files(root / "full")


@pytest.mark.parametrize("field", ["reserved", "shard", "carry"])
@pytest.mark.parametrize("where", ["../victim.txt", "ABSOLUTE"])
def test_names_in_a_manifest_never_reach_outside_the_cache(corpora, monkeypatch, field, where):
    root, _ = corpora
    victim = root / "victim.txt"
    victim.write_text("the user's file")
    name = str(victim) if where == "ABSOLUTE" else where
    src = tc.resolve_source(str(root / "j"))
    kw = dict(val_fraction=0.25, shard_tokens=2000, batch_docs=16, progress=False, log=lambda *a: None)
    interrupted_build(monkeypatch, src, root / "c", kw, at_shard=3)
    path = root / "c" / "manifest.json"
    m = json.loads(path.read_text())
    if field == "reserved":
        m["reserved"].append(name)
    elif field == "shard":
        next(e for split in ("train", "val") for e in m["shards"][split])["name"] = name
    else:
        m["carry"] = name
    path.write_text(json.dumps(m))
    for call in (lambda: tc.build_cache(src, root / "c", **kw), lambda: tc.load_cache(root / "c"),
                 lambda: tc.main(["verify", str(root / "c")])):
        with pytest.raises(gt.UserError, match="damaged or was edited"):
            call()
    assert victim.read_text() == "the user's file"


@pytest.mark.parametrize("edit", ["no shards at all", "train list emptied", "train list and count emptied"])
def test_an_edited_manifest_is_refused_by_verify_inspect_and_training(corpora, edit, tmp_path, capsys):
    from conftest import run_cli

    import pretraining_advanced as adv

    root, _ = corpora
    src = tc.resolve_source(str(root / "j"))
    tc.build_cache(src, root / "c", val_fraction=0.25, shard_tokens=2000, progress=False, log=lambda *a: None)
    path = root / "c" / "manifest.json"
    m = json.loads(path.read_text())
    if edit == "no shards at all":
        m["shards"] = []
    else:
        m["shards"]["train"] = []
        if edit == "train list and count emptied":
            m["train_tokens"] = 0
    path.write_text(json.dumps(m))
    for main, argv in ((tc.main, ["verify", root / "c"]), (tc.main, ["inspect", root / "c"]),
                       (adv.main, ["--data", root / "j", "--cache_dir", root / "c", "--model", "debug", "--max_steps",
                                   "1", "--run_dir", tmp_path / "r", "--no-progress", "--val_fraction", "0.25"])):
        code, out, err = run_cli(main, argv, capsys)
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_a_folder_saved_by_datasets_is_a_source(corpora, tmp_path):
    import datasets

    root, docs = corpora
    ds = datasets.Dataset.from_dict({"body": docs, "n": list(range(len(docs)))})
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(5))}).save_to_disk(str(tmp_path / "dict"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "no_train"))
    direct = gt.encode_documents(docs)
    for folder in ("one", "dict"):
        src = tc.resolve_source(str(tmp_path / folder), text_column="body")
        m = tc.build_cache(src, tmp_path / f"cache_{folder}", val_fraction=0.25, progress=False, log=lambda *a: None)
        assert m["source"]["kind"] == "hf-disk" and m["tokens_consumed"] == len(direct) and m["documents"] == len(docs)
    with pytest.raises(gt.UserError, match="without a 'train' split .*test"):
        tc.resolve_source(str(tmp_path / "no_train"))
    with pytest.raises(gt.UserError, match="has no text column 'text' .*body"):
        tc.build_cache(tc.resolve_source(str(tmp_path / "one")), tmp_path / "c3", progress=False)


def test_symlinked_files_are_read_and_said_and_linked_folders_are_not_entered(corpora, tmp_path):
    root, docs = corpora
    data = tmp_path / "data"
    data.mkdir()
    (data / "own.jsonl").write_text(json.dumps({"text": "a document of the folder's own"}) + "\n")
    (data / "linked.jsonl").symlink_to(root / "j" / "part.jsonl")
    (data / "folder").symlink_to(root / "t", target_is_directory=True)
    logs = []
    src = tc.resolve_source(str(data))
    m = tc.build_cache(src, tmp_path / "c", val_fraction=0.25, progress=False, log=logs.append)
    assert m["documents"] == 1 + len(docs)  # its own file and the linked one; not the linked folder's
    assert any("symlinks to files outside it" in line and "linked.jsonl" in line for line in logs)
    assert any("1 symlinked folder(s)" in line for line in logs)
