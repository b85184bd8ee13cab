"""`moee export --tokenizer T` refuses a T that is not a tokenizer, and a tokenizer whose
vocabulary is not the model's embedding, before writing anything."""

from __future__ import annotations

from conftest import llm_moe_checkpoint

from moee.cli import main


def _word_tokenizer(folder, words: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(["[UNK]", *words])},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def test_export_refuses_a_folder_without_a_tokenizer_or_of_another_vocabulary(
        tiny_llm, tmp_path, capsys):
    folder, _ = tiny_llm
    checkpoint = llm_moe_checkpoint(folder, tmp_path / "moe")
    not_a_tokenizer = tmp_path / "notes"
    not_a_tokenizer.mkdir()
    (not_a_tokenizer / "readme.txt").write_text("no tokenizer here")
    small = tmp_path / "small"
    _word_tokenizer(small, ["a", "b", "c"])
    for tokenizer, why in ((not_a_tokenizer, "no tokenizer could be loaded"),
                           (small, "vocabulary of 4 tokens")):
        capsys.readouterr()
        code = main(["export", str(checkpoint), "--to", "mixtral", "--tokenizer", str(tokenizer),
                     "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "tokenizer" in err and why in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()
    assert main(["export", str(checkpoint), "--to", "mixtral", "--tokenizer", str(folder),
                 "--out", str(tmp_path / "out")]) == 0  # the model's own tokenizer
    assert (tmp_path / "out" / "tokenizer.json").is_file()
