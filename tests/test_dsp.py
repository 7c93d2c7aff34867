"""The DSP loader: domain-vs-domain pairs, split by query. The real-data tests skip when the file is absent."""

import json
from collections import Counter

import pytest

from benchmarks.dsp import DSP_DOMAINS, dsp_path, load_dsp_pairs, load_dsp_rows, split_dsp_by_query
from benchmarks.real_datasets import DATA_DIR_ENV, RealDataMissingError, resolve_data_dir


def _real_dsp():
    try:
        return dsp_path()
    except RealDataMissingError as error:
        pytest.skip(f"DSP data not available: {error}")


def _fake_dsp(tmp_path, num_queries: int = 5, empty_normal: bool = False):
    """A tiny made-up file with DSP's schema (not real data)."""
    rows = []
    for index in range(num_queries):
        responses = {domain: f"{domain} answer {index}" for domain in DSP_DOMAINS}
        responses["normal"] = "" if empty_normal and index == 0 else f"plain answer {index}"
        rows.append({"query": f"question {index}", "responses": responses})
    folder = tmp_path / "dsp"
    folder.mkdir()
    (folder / "domain_specific_preference.test.json").write_text(json.dumps(rows))
    return tmp_path


def test_pairs_follow_the_readme_on_a_made_up_file(tmp_path):
    pairs = load_dsp_pairs(_fake_dsp(tmp_path))
    assert len(pairs) == 5 * 4 * 3
    for row in pairs:
        assert row["user_id"] == row["category"] != row["rejected_domain"]
        assert row["chosen"] == f"{row['user_id']} answer {row['query_id']}"
        assert row["rejected"] == f"{row['rejected_domain']} answer {row['query_id']}"
        assert row["prompt"] == f"question {row['query_id']}"
    assert set(pairs["rejected_domain"]) == set(DSP_DOMAINS)


def test_normal_pairs_are_opt_in_and_skip_empty_responses(tmp_path):
    pairs = load_dsp_pairs(_fake_dsp(tmp_path, empty_normal=True), include_normal=True)
    normal = pairs.filter(lambda row: row["rejected_domain"] == "normal")
    assert len(normal) == 4 * 4  # the query with an empty normal response has none
    assert len(pairs) == 5 * 4 * 3 + 16


def test_missing_file_raises_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(RealDataMissingError, match="TRL_MOE_RM_DATA"):
        load_dsp_pairs(tmp_path / "nowhere")
    with pytest.raises(RealDataMissingError, match="missing.json"):
        load_dsp_rows(tmp_path / "missing.json")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir() == tmp_path
    with pytest.raises(FileNotFoundError):
        dsp_path()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="JSON list"):
        load_dsp_rows(tmp_path / "bad.json")


def test_split_by_query_on_a_made_up_file(tmp_path):
    pairs = load_dsp_pairs(_fake_dsp(tmp_path, num_queries=10))
    split = split_dsp_by_query(pairs, test_size=0.2, seed=1)
    train_queries, test_queries = set(split["train"]["query_id"]), set(split["test"]["query_id"])
    assert len(test_queries) == 2 and len(train_queries) == 8 and not train_queries & test_queries
    assert len(split["train"]) + len(split["test"]) == len(pairs)
    with pytest.raises(ValueError, match="test_size"):
        split_dsp_by_query(pairs, test_size=1.0)


def test_real_dsp_has_exactly_661_x_4_x_3_domain_pairs():
    path = _real_dsp()
    rows = load_dsp_rows(path)
    pairs = load_dsp_pairs(path)
    assert len(rows) == 661
    assert len(pairs) == 661 * 4 * 3 == 7932
    assert "normal" not in set(pairs["rejected_domain"]) | set(pairs["user_id"])
    assert Counter(pairs["user_id"]) == {domain: 661 * 3 for domain in DSP_DOMAINS}
    assert set(Counter(pairs["query_id"]).values()) == {12}
    for index in (0, 1234, 7931):
        row = pairs[index]
        responses = rows[row["query_id"]]["responses"]
        assert row["chosen"] == responses[row["user_id"]] and row["rejected"] == responses[row["rejected_domain"]]
        assert row["prompt"] == rows[row["query_id"]]["query"]
    # Every response pair appears once with each label.
    ordered = Counter((row["query_id"], row["user_id"], row["rejected_domain"]) for row in pairs)
    assert all(ordered[(query, other, domain)] == 1 for query, domain, other in ordered)


def test_real_dsp_splits_by_query_without_overlap():
    pairs = load_dsp_pairs(_real_dsp())
    split = split_dsp_by_query(pairs, test_size=0.2, seed=0)
    train_queries, test_queries = set(split["train"]["query_id"]), set(split["test"]["query_id"])
    assert not train_queries & test_queries
    assert not set(split["train"]["prompt"]) & set(split["test"]["prompt"])
    assert len(test_queries) == round(0.2 * 661) and len(train_queries) + len(test_queries) == 661
    assert len(split["train"]) == 12 * len(train_queries) and len(split["test"]) == 12 * len(test_queries)
