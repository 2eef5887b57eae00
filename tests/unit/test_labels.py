"""Labels from the oracle or a person (core.labels): the labels file's checks and the run-name digest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pivotal_ray.config import ConfigError, from_dict
from pivotal_ray.core.labels import (FileLabels, OracleLabels, labels_digest, labels_suffix, read_label_file,
                                     to_label_rows)
from pivotal_ray.pipeline import run_identity

TRAIN_IDS = np.arange(0, 100, 2, dtype=np.int64)  # even ids only


def _write(tmp_path, text: str):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_a_missing_file_holds_no_labels_yet(tmp_path):
    lab = FileLabels(tmp_path / "labels.csv", train_ids=TRAIN_IDS, num_classes=3)
    assert len(lab) == 0
    assert lab.missing(np.array([4, 2])).tolist() == [4, 2]


def test_labels_are_read_back_and_missing_ones_named_in_order(tmp_path):
    path = _write(tmp_path, "sample_id,label\n4,2\n 10 , 0\n4,2\n")  # a repeated identical row is fine
    lab = FileLabels(path, train_ids=TRAIN_IDS, num_classes=3)
    assert lab.labels(np.array([10, 4])).tolist() == [0, 2]
    assert lab.missing(np.array([12, 4, 6, 10])).tolist() == [12, 6]
    with pytest.raises(KeyError):
        lab.labels(np.array([12]))


def test_a_filled_in_to_label_file_is_a_labels_file(tmp_path):
    """Extra columns are ignored and rows whose label is still empty count as unlabelled."""
    df = to_label_rows(np.array([8, 6]), observed={8: 1, 6: 0}, round_=1, cluster=[0, 1], score=[0.5, 0.25],
                       locate=lambda ids: [f"/img/{i}.png" for i in ids])
    assert list(df.columns) == ["sample_id", "observed_label", "round", "cluster", "score", "path", "label"]
    assert df["path"].tolist() == ["/img/8.png", "/img/6.png"] and (df["label"] == "").all()
    df.loc[df["sample_id"] == 8, "label"] = "2"
    path = tmp_path / "labels.csv"
    df.to_csv(path, index=False)
    lab = FileLabels(path, train_ids=TRAIN_IDS, num_classes=3)
    assert lab.labels(np.array([8])).tolist() == [2]
    assert lab.missing(np.array([8, 6])).tolist() == [6]


@pytest.mark.parametrize("text, fragment", [
    ("id,label\n4,1\n", "has no column(s) ['sample_id']"),
    ("sample_id,label\n4,one\n", "label must be an integer, got ['one'] (line(s) [2])"),
    ("sample_id,label\n4,1.5\n", "label must be an integer"),
    ("sample_id,label\nx4,1\n", "sample_id must be an integer"),
    ("sample_id,label\n4,3\n", "are not classes of this data set (0 to 2)"),
    ("sample_id,label\n4,-1\n", "are not classes of this data set"),
    ("sample_id,label\n5,1\n", "sample id(s) [5] are not in the training split"),
    ("sample_id,label\n4,1\n4,2\n", "sample 4 is labelled both 1 and 2"),
    ("sample_id,label\n12,0,1\n10,1,1\n", "line(s) [2, 3] have another number of fields than the header's 2"),
    ("sample_id,label\n4,1\n\n6\n", "line(s) [4] have another number of fields"),
    ("sample_id,label\n4,1\n\n6,x\n", "got ['x'] (line(s) [4])"),
    ("", "is empty"),
    ("sample_id,label,label\n4,1,1\n", "names column(s) ['label'] more than once"),
])
def test_a_bad_labels_file_names_the_file_the_rows_and_the_fix(tmp_path, text, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        read_label_file(path, train_ids=TRAIN_IDS, num_classes=3)
    assert fragment in str(err.value) and str(path) in str(err.value) and "sample_id,label" in str(err.value)


def test_the_oracle_gives_the_true_labels_and_misses_none():
    lab = OracleLabels(np.array([1, 5, 9]), np.array([2, 0, 1]))
    assert lab.labels(np.array([9, 1])).tolist() == [1, 2]
    assert lab.missing(np.array([9, 1])).size == 0


def test_the_digest_depends_on_the_pairs_not_their_order():
    a = labels_digest([3, 1, 2], [0, 1, 1])
    assert a == labels_digest([1, 2, 3], [1, 1, 0])
    assert a != labels_digest([1, 2, 3], [1, 1, 1])  # one corrected label: another run
    assert a != labels_digest([1, 2, 4], [1, 1, 0])
    assert labels_suffix("file", [3, 1, 2], [0, 1, 1]) == f"-labels{a}"
    assert labels_suffix("oracle", [3, 1, 2], [0, 1, 1]) == ""  # oracle runs keep their names


def test_labels_config_checks_and_run_identity(tmp_path):
    with pytest.raises(ConfigError, match="unknown labels.source 'person'"):
        from_dict({"labels": {"source": "person"}})
    with pytest.raises(ConfigError, match="must be an absolute path"):
        from_dict({"labels": {"source": "file", "file": "labels.csv"}})
    oracle = from_dict({"output_dir": str(tmp_path)})
    assert oracle.labels_file == str(tmp_path / "labels.csv")
    assert "labels" not in run_identity(oracle)  # oracle runs keep their names
    a = from_dict({"labels": {"source": "file", "file": "/a.csv"}})
    b = from_dict({"labels": {"source": "file", "file": "/b.csv"}})
    assert run_identity(a) == run_identity(b) and run_identity(a)["labels"] == {"source": "file"}


def test_an_image_folder_run_exports_each_samples_image_path_before_any_training(tmp_path, monkeypatch):
    """The first stop (the warm-up's samples) trains nothing, after the cluster checks (it claims
    output_dir): to_label_round0.csv names the files to look at."""
    from PIL import Image

    from pivotal_ray import pipeline
    from pivotal_ray.core.data import build_data

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 5)):
        for c in ("ant", "bee"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / c / f"{k}.png")
    from pivotal_ray import training

    checked = []
    monkeypatch.setattr(pipeline, "connect", lambda cfg: checked.append("connect"))
    monkeypatch.setattr(pipeline, "_check_cluster", lambda cfg, bundle: checked.append("cluster"))
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("training ran"))
    out = tmp_path / "out"
    cfg = from_dict({"output_dir": str(out), "data": {"name": "imagefolder", "root": str(tmp_path / "data"),
                                                      "image_size": 16},
                     "noise": {"kind": "none"}, "model": {"name": "resnet18"},
                     "selection": {"budget": 3, "warmup": 2}, "labels": {"source": "file"}})
    stop = pipeline.run_experiment(cfg)
    assert (stop["status"], stop["round"], stop["missing"]) == ("awaiting_labels", 0, 2)
    assert checked == ["connect", "cluster"]
    df = pd.read_csv(out / "to_label_round0.csv", keep_default_na=False)
    bundle = build_data(cfg.data, cfg.noise, cfg.seed)
    for sid, path in zip(df["sample_id"], df["path"]):
        label = int(bundle.train.y_obs[bundle.train.positions_of([sid])[0]])
        assert Path(path).parent.name == ("ant", "bee")[label] and Path(path).is_file()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "to_label_round0.csv"]


def test_a_spreadsheets_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("sample_id,label\n4,2\n".encode("utf-8-sig"))  # Excel's "CSV UTF-8"
    assert FileLabels(path, train_ids=TRAIN_IDS, num_classes=3).labels(np.array([4])).tolist() == [2]


def test_a_file_that_is_not_utf8_names_the_file_and_the_fix(tmp_path):
    """A labels file saved in another encoding (Latin-1 here) is a ConfigError naming the file,
    not a UnicodeDecodeError out of the job."""
    path = tmp_path / "labels.csv"
    path.write_bytes(b"sample_id,label\n4,\xe9\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text") as err:
        read_label_file(path, train_ids=TRAIN_IDS, num_classes=3)
    assert str(path) in str(err.value) and "sample_id,label" in str(err.value)
    assert "save it as a UTF-8 CSV" in str(err.value)
    path.write_bytes("sample_id,label\n4,1\n".encode("utf-16"))  # a spreadsheet's "Unicode text"
    with pytest.raises(ConfigError, match="save it as a UTF-8 CSV"):
        read_label_file(path, train_ids=TRAIN_IDS, num_classes=3)


@pytest.mark.parametrize("cell", ["inf", "-inf", "1e400", "nan", "1.5", "0x1", "1_0", "0.99999999999999999",
                                  "12.0000000000000001", "\u0661\u0662", "1e99999999999"])
def test_labels_that_name_no_integer_exactly_are_refused_by_their_text(tmp_path, cell):
    """Not finite, not whole, or a float too large to name one integer: refused as written (a
    pandas cast of inf raised IntCastingNaNError out of the job)."""
    path = _write(tmp_path, f"sample_id,label\n4,{cell}\n")
    with pytest.raises(ConfigError, match=r"label must be an integer, got \[" + repr(cell).replace(".", r"\.")):
        read_label_file(path, train_ids=TRAIN_IDS, num_classes=3)


def test_integers_are_read_exactly_whatever_their_size(tmp_path):
    """Whole numbers in any spelling are taken; an id beyond int64 is reported as written, not
    wrapped around (it was reported as -9223372036854775808)."""
    path = _write(tmp_path, "sample_id,label\n+4,1.0\n6,1e0\n0.8e1,.2e1\n")
    assert read_label_file(path, train_ids=TRAIN_IDS, num_classes=3) == {4: 1, 6: 1, 8: 2}
    path = _write(tmp_path, "sample_id,label\n99999999999999999999,1\n4,0\n9007199254740993.0,1\n1e16,0\n")
    with pytest.raises(ConfigError, match=r"sample id\(s\) \[99999999999999999999, 9007199254740993, "
                                          r"10000000000000000\] are not in"):
        read_label_file(path, train_ids=TRAIN_IDS, num_classes=3)
    path = _write(tmp_path, "sample_id,label\n4,99999999999999999999\n")
    with pytest.raises(ConfigError, match=r"label\(s\) \[99999999999999999999\] of sample\(s\) \[4\]"):
        read_label_file(path, train_ids=TRAIN_IDS, num_classes=3)


def test_whitespace_only_lines_and_padded_header_names_are_accepted(tmp_path):
    """What a person's editor leaves: a line of blanks (skipped like an empty one) and spaces
    around the header's names."""
    path = _write(tmp_path, "sample_id ,label \n4,1\n \t \n6,0\n")
    assert read_label_file(path, train_ids=TRAIN_IDS, num_classes=3) == {4: 1, 6: 0}
    path = _write(tmp_path, " sample_id, label\n4,1\n   \n")
    assert read_label_file(path, train_ids=TRAIN_IDS, num_classes=3) == {4: 1}



def test_signed_exponents_and_ids_beyond_int64_either_way(tmp_path):
    """A spreadsheet writes exponents with a sign (1E+0); an id far below int64 is reported as
    written, like one far above it (it raised OverflowError)."""
    assert read_label_file(_write(tmp_path, "sample_id,label\n4e+0,1E+0\n"), train_ids=TRAIN_IDS, num_classes=3) == {4: 1}
    with pytest.raises(ConfigError, match=r"sample id\(s\) \[-99999999999999999999\] are not in"):
        read_label_file(_write(tmp_path, "sample_id,label\n-99999999999999999999,1\n"), train_ids=TRAIN_IDS,
                        num_classes=3)
    with pytest.raises(ConfigError, match="must be an integer"):  # over 40 digits: not expanded
        read_label_file(_write(tmp_path, "sample_id,label\n4," + "1" + "0" * 40 + "\n"), train_ids=TRAIN_IDS,
                        num_classes=3)
    with pytest.raises(ConfigError, match=r"label\(s\) \[" + "1" + "0" * 39 + r"\]"):  # 40 digits: a number
        read_label_file(_write(tmp_path, "sample_id,label\n4," + "1" + "0" * 39 + "\n"), train_ids=TRAIN_IDS,
                        num_classes=3)
