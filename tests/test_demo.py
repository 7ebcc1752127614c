import io

from csearch.demo import run_demo


def test_demo_indexes_and_queries_its_catalogue(tmp_path, tiny_config):
    out = io.StringIO()
    run_demo(tmp_path / "demo", tiny_config, out)
    text = out.getvalue()
    assert "queries found their product first" in text
    found = int(text.split("queries found their product first")[0].split()[-1].split("/")[0])
    assert found >= 3  # 9 look-alike products; even the tiny random extractor beats chance (1/9)
    assert (tmp_path / "demo" / "index" / "manifest.json").is_file()
    assert (tmp_path / "demo" / "index" / "config.yaml").is_file()
