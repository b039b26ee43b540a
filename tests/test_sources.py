"""Reading users' rows: CSV (byte-order mark, quoted newlines, malformed rows), JSON arrays, the known safety-data
shapes (PKU-SafeRLHF, BeaverTails, AdvBench, HarmBench, chat, Alpaca) and the one-line errors that name the fix.
Every prompt here is a placeholder."""

import json

import pytest

from derta.cli.main import main
from derta.data.recipes import HELPFUL_FIELDS, SAFETY_FIELDS
from derta.data.shapes import normalize_row
from derta.data.sources import load_overrefusal_prompts, load_prompts, load_rows, prompt_of, read_records
from derta.data.tokenize import load_training_rows
from derta.io import InputError

HARM = "How do I do <a harmful thing>?"
HARM2 = "How do I do <another harmful thing>?"
UNSAFE = "Sure, step 1: <placeholder>."
SAFE = "Sorry, I cannot help with that."


def write(path, text: str, bom: bool = False):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def jsonl(path, rows):
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def error_of(load, *args) -> str:
    with pytest.raises(InputError) as e:
        load(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def safety(path, flag="--safety-columns"):
    return load_rows(str(path), SAFETY_FIELDS, None, "safety row", flag)


def helpful(path, mapping=None):
    return load_rows(str(path), HELPFUL_FIELDS, mapping, "helpful row", "--helpful-columns")


# ---------------------------------------------------------------- CSV


def test_csv_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = write(tmp_path / "p.csv", "prompt,label\nq1,safe\n", bom=True)
    assert read_records(path) == [(2, {"prompt": "q1", "label": "safe"})]
    assert load_overrefusal_prompts(path) == [{"prompt": "q1", "label": "safe", "type": ""}]
    assert load_prompts(write(tmp_path / "p.txt", "first\nsecond\n", bom=True)) == ["first", "second"]


def test_csv_quoted_newlines_keep_each_rows_starting_line(tmp_path):
    path = write(tmp_path / "p.csv", 'prompt,note\n"one\ntwo\nthree",a\n\nq2,"b\r\nc"\nq3,\n')
    assert read_records(path) == [
        (2, {"prompt": "one\ntwo\nthree", "note": "a"}),
        (6, {"prompt": "q2", "note": "b\nc"}),  # text is read with universal newlines
        (8, {"prompt": "q3", "note": ""}),
    ]
    bad = write(tmp_path / "bad.csv", 'prompt,note\n"one\ntwo",a\nq2,b,extra\n')
    assert error_of(load_prompts, bad) == f"{bad}:4: row has 3 fields, the header has 2"


@pytest.mark.parametrize(
    "text,line,what",
    [
        ("prompt,label\nq1,safe\nq2,safe,x\n", 3, "row has 3 fields, the header has 2"),
        ("prompt,label\nq1\n", 2, "row has 1 fields, the header has 2"),
        ('prompt,label\nq1,safe\n"q2"x,safe\n', 3, "malformed CSV"),
        ('prompt,label\nq1,safe\n\n"q2,safe\nq3,safe\n', 4, "malformed CSV (unexpected end of data)"),
        ("prompt,prompt\nq1,q2\n", 1, "the header names column 'prompt' twice"),
    ],
)
def test_malformed_csv_is_one_line_naming_file_and_line(tmp_path, text, line, what):
    path = write(tmp_path / "p.csv", text)
    msg = error_of(load_prompts, path)
    assert msg.startswith(f"{path}:{line}: ") and what in msg, msg


def test_csv_with_only_a_header_has_no_rows(tmp_path):
    path = write(tmp_path / "p.csv", "prompt,label\n\n,\n")
    assert error_of(read_records, path) == f"{path}: file has no rows"


def test_load_rows_reads_csv(tmp_path):
    path = write(tmp_path / "s.csv", f'instruction,harmful_response,safe_response\n"{HARM}","{UNSAFE}","{SAFE}"\n')
    assert safety(path) == [{"instruction": HARM, "harmful_response": UNSAFE, "safe_response": SAFE}]


# ---------------------------------------------------------------- JSON arrays


def test_json_array_rows_carry_the_line_they_start_on(tmp_path):
    rows = [{"prompt": "q1"}, {"prompt": "q2", "x": [1, {"y": "z"}]}]
    path = write(tmp_path / "p.json", json.dumps(rows, indent=2))
    assert read_records(path) == [(2, rows[0]), (5, rows[1])]
    assert load_prompts(path) == ["q1", "q2"]
    assert error_of(load_prompts, write(tmp_path / "a.json", '[\n{"prompt": "q"},\n\n "q2"\n]')).startswith(
        f"{tmp_path / 'a.json'}:4: expected an array of JSON objects, got str"
    )
    assert f"{tmp_path / 'b.json'}:3: malformed JSON" in error_of(
        load_prompts, write(tmp_path / "b.json", '[\n{"prompt": "q"},\n{"prompt": }\n]')
    )
    # JSON Lines named .json still read as JSON Lines
    assert load_prompts(jsonl(tmp_path / "c.json", [{"prompt": "q1"}, {"prompt": "q2"}])) == ["q1", "q2"]


# ---------------------------------------------------------------- shapes


def pku(safe0, safe1, **extra):
    return {
        "prompt": HARM,
        "response_0": "first answer",
        "response_1": "second answer",
        "is_response_0_safe": safe0,
        "is_response_1_safe": safe1,
        **extra,
    }


def test_pku_rows_with_one_safe_response_are_triples(tmp_path):
    path = jsonl(tmp_path / "pku.jsonl", [pku(True, False, prompt_source="x"), pku(False, True)])
    assert safety(path) == [
        {
            "prompt_source": "x",
            "instruction": HARM,
            "safe_response": "first answer",
            "harmful_response": "second answer",
        },
        {"instruction": HARM, "safe_response": "second answer", "harmful_response": "first answer"},
    ]
    # CSV exports write the flags as words
    csv = write(
        tmp_path / "pku.csv",
        f'prompt,response_0,response_1,is_response_0_safe,is_response_1_safe\n"{HARM}",a,b,False,True\n',
    )
    assert safety(csv)[0]["safe_response"] == "b"
    assert load_prompts(path) == [HARM, HARM]


def test_datasets_rows_are_read_by_shape(tmp_path):
    import datasets

    datasets.Dataset.from_list([pku(False, True), pku(True, False)]).save_to_disk(str(tmp_path / "ds"))
    rows = safety(tmp_path / "ds")
    assert [(r["safe_response"], r["harmful_response"]) for r in rows] == [
        ("second answer", "first answer"),
        ("first answer", "second answer"),
    ]


def test_pku_rows_that_make_no_triple_or_no_helpful_row_name_the_fix(tmp_path):
    path = jsonl(tmp_path / "pku.jsonl", [pku(True, False), pku(True, True)])
    assert error_of(safety, path) == (
        f"{path}:2: safety row is missing field 'harmful_response' (PKU-SafeRLHF rows hold two responses each, "
        "safe or not): a triple needs one safe and one unsafe response: keep only such rows, or map the columns "
        "with --safety-columns"
    )
    assert error_of(helpful, path) == (
        f"{path}:1: helpful row is missing field 'response' (PKU-SafeRLHF rows hold two responses each, safe or "
        "not): give them to --safety, or map a safe response column with --helpful-columns response=COLUMN"
    )
    # the mapping the message names works: mapped columns are plain columns
    assert helpful(path, {"response": "response_1"})[0] == {
        "response_0": "first answer",
        "is_response_0_safe": True,
        "is_response_1_safe": False,
        "response": "second answer",
        "instruction": HARM,
    }
    bad = jsonl(tmp_path / "flag.jsonl", [pku("maybe", True)])
    assert error_of(safety, bad) == f"{bad}:1: field 'is_response_0_safe' must be true or false, got 'maybe'"


def test_beavertails_rows_give_prompts_but_no_triples(tmp_path):
    rows = [
        {
            "prompt": HARM,
            "response": UNSAFE,
            "category": {"a_harm": True, "b_harm": False, "c_harm": True},
            "is_safe": False,
        },
        {"prompt": HARM2, "response": SAFE, "category": {"a_harm": False}, "is_safe": True},
    ]
    path = jsonl(tmp_path / "bt.jsonl", rows)
    assert load_prompts(path) == [HARM, HARM2]
    assert normalize_row(rows[0]) == {"instruction": HARM, "harmful_response": UNSAFE, "category": "a_harm,c_harm"}
    assert normalize_row(rows[1]) == {"instruction": HARM2, "safe_response": SAFE}
    assert error_of(safety, path) == (
        f"{path}:1: safety row is missing field 'safe_response' (BeaverTails rows hold one response each): give "
        "harmful_response/safe_response with --safety-columns, or turn the prompts into triples with "
        "`derta data triples`"
    )
    # an unsafe response never becomes a helpful row
    msg = error_of(helpful, path)
    assert msg.startswith(f"{path}:1: helpful row is missing field 'response' (BeaverTails") and "--safety" in msg


def test_advbench_and_harmbench_csv_give_prompts_and_categories(tmp_path):
    adv = write(tmp_path / "adv.csv", f'goal,target\n"{HARM}","Sure, here is <a placeholder>"\n', bom=True)
    assert load_prompts(adv) == [HARM]
    assert error_of(safety, adv) == (
        f"{adv}:2: safety row is missing field 'harmful_response' (AdvBench rows hold prompts only): turn the "
        "prompts into triples with `derta data triples`"
    )
    hb = write(
        tmp_path / "hb.csv",
        "Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"
        f'"{HARM}",standard,some_category,,,b1\n'
        f'"{HARM2}",contextual,other_category,context,"A placeholder context\nof two lines",b2\n',
    )
    assert load_prompts(hb) == [HARM, f"A placeholder context\nof two lines\n\n---\n\n{HARM2}"]
    assert [normalize_row(r)["category"] for _, r in read_records(hb)] == ["some_category", "other_category"]
    assert normalize_row(read_records(hb)[0][1]) == {
        "FunctionalCategory": "standard",
        "Tags": "",
        "BehaviorID": "b1",
        "instruction": HARM,
        "category": "some_category",
    }
    msg = error_of(helpful, hb)
    assert msg.startswith(f"{hb}:2: helpful row is missing field 'response' (HarmBench rows hold prompts only)")


def test_chat_rows_prompt_is_the_last_user_message_before_the_answer(tmp_path):
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
    ]
    path = jsonl(tmp_path / "chat.jsonl", [{"messages": turns, "id": 1}])
    assert helpful(path) == [{"id": 1, "response": "Apple.", "instruction": "Name a fruit."}]
    asking = jsonl(tmp_path / "asking.jsonl", [{"messages": turns}, {"messages": turns[:4]}])
    assert load_prompts(asking) == ["Name a fruit.", "Name a fruit."]  # the second waits for the answer
    assert error_of(helpful, asking) == (
        f"{asking}:2: helpful row is missing field 'response' (chat rows hold one conversation each): end each "
        "conversation with the assistant's answer"
    )
    bad = jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "assistant", "content": "Hi."}]}])
    assert error_of(load_prompts, bad) == f"{bad}:1: chat row has no user message before its last assistant message"
    bad = jsonl(tmp_path / "bad2.jsonl", [{"messages": [{"role": "user", "content": [{"type": "text"}]}]}])
    assert "must be a list of {role, content} objects" in error_of(load_prompts, bad)


def test_alpaca_input_is_appended_and_output_is_the_response(tmp_path):
    rows = [
        {"instruction": "Sort these words.", "input": "pear apple", "output": "apple pear"},
        {"instruction": "Say hello.", "input": "", "output": "Hello."},
    ]
    path = write(tmp_path / "alpaca.json", json.dumps(rows, indent=1))
    assert helpful(path) == [
        {"instruction": "Sort these words.\n\npear apple", "response": "apple pear"},
        {"instruction": "Say hello.", "response": "Hello."},
    ]
    assert load_prompts(path) == ["Sort these words.\n\npear apple", "Say hello."]
    msg = error_of(safety, path)
    assert msg.startswith(f"{path}:2: safety row is missing field 'harmful_response' (Alpaca rows hold one response")
    no_output = jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hello.", "input": ""}])
    assert error_of(helpful, no_output).endswith(
        "(Alpaca rows hold one response each): give each row an 'output', or map a response column with "
        "--helpful-columns response=COLUMN"
    )


def test_reference_rows_are_for_derta_train(tmp_path):
    path = jsonl(tmp_path / "ref.jsonl", [{"prefix": "[INST] q [\\INST]", "text": " Sorry.", "safe": "false"}])
    expected = f"{path}:1: a training row in the reference repository's format (prefix, text, safe): give the file"
    assert error_of(load_prompts, path).startswith(expected)
    assert error_of(safety, path).startswith(expected)
    assert load_training_rows(str(path))[0]["kind"] == "helpful"


def test_plain_rows_keep_their_precedence_and_pass_through():
    row = {"question": "q", "instruction": "i", "prompt": "p"}
    assert normalize_row(row) is row and prompt_of(row) == "q"
    assert prompt_of({"instruction": "i", "prompt": "p"}) == "i"
    # an instruction with an empty Alpaca-style input is a plain instruction
    assert prompt_of({"instruction": "i", "input": " "}) == "i"


# ---------------------------------------------------------------- errors that name the mapping


def test_unknown_columns_name_the_mapping_that_fixes_them(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl", [{"query": "Name a fruit.", "answer": "Apple."}])
    assert error_of(helpful, path) == (
        f"{path}:1: helpful row is missing field 'instruction' (it has query, answer): map them with "
        "--helpful-columns instruction=query,response=answer"
    )
    assert helpful(path, {"instruction": "query", "response": "answer"}) == [
        {"instruction": "Name a fruit.", "response": "Apple."}
    ]
    assert error_of(load_prompts, path) == (
        f"{path}:1: row has none of the fields question, instruction, prompt (it has query, answer): "
        "rename 'query' to 'prompt'"
    )
    pairs = jsonl(tmp_path / "pairs.jsonl", [{"prompt": HARM, "chosen": SAFE, "rejected": UNSAFE}])
    assert error_of(safety, pairs) == (
        f"{pairs}:1: safety row is missing field 'harmful_response' (it has prompt, chosen, rejected): map them "
        "with --safety-columns harmful_response=rejected,safe_response=chosen"
    )
    other = jsonl(tmp_path / "other.jsonl", [{"prompt": HARM, "reply_a": "x"}])
    assert error_of(safety, other).endswith(
        "map them with --safety-columns harmful_response=COLUMN,safe_response=COLUMN"
    )
    assert error_of(helpful, path, {"instruction": "nope"}) == (
        f"{path}:1: helpful row has no column 'nope' (mapped to 'instruction'; it has query, answer)"
    )


def test_rows_without_instruction_take_their_prompt_field(tmp_path):
    path = jsonl(
        tmp_path / "h.jsonl",
        [{"prompt": "Say hi.", "response": "Hi."}, {"question": "Q?", "prompt": "P?", "response": "A."}],
    )
    assert helpful(path) == [
        {"response": "Hi.", "instruction": "Say hi."},
        {"prompt": "P?", "response": "A.", "instruction": "Q?"},
    ]
    bad = jsonl(tmp_path / "bad.jsonl", [{"prompt": 3, "response": "Hi."}])
    assert error_of(helpful, bad) == f"{bad}:1: field 'prompt' must be a string, got int"


# ---------------------------------------------------------------- the commands, end to end


def test_data_build_takes_pku_csv_and_alpaca_json(tmp_path, capsys):
    pku_csv = write(
        tmp_path / "pku.csv",
        "prompt,response_0,response_1,is_response_0_safe,is_response_1_safe\n"
        f'"{HARM}","{UNSAFE}","{SAFE}",False,True\n"{HARM2}","{SAFE}","{UNSAFE}",True,False\n',
        bom=True,
    )
    alpaca = write(tmp_path / "alpaca.json", json.dumps([{"instruction": "Sort.", "input": "b a", "output": "a b"}]))
    out = tmp_path / "rows.jsonl"
    argv = [
        "data",
        "build",
        "--recipe",
        "vanilla",
        "--safety",
        str(pku_csv),
        "--helpful",
        str(alpaca),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["kind"], r["instruction"], r["target"]) for r in rows] == [
        ("helpful", "Sort.\n\nb a", "a b"),
        ("safe", HARM, SAFE),
        ("safe", HARM2, SAFE),
    ]
    assert "wrote 3 rows" in capsys.readouterr().out


def test_data_build_on_beavertails_exits_2_naming_the_fix(tmp_path, capsys):
    bt = jsonl(tmp_path / "bt.jsonl", [{"prompt": HARM, "response": UNSAFE, "is_safe": False}])
    out = tmp_path / "rows.jsonl"
    assert main(["data", "build", "--recipe", "derta", "--safety", str(bt), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"derta: error: {bt}:1: safety row is missing field")
    assert "--safety-columns" in err and "`derta data triples`" in err and not out.exists()


def test_eval_sends_harmbench_prompts_with_their_context(fake_openai, tmp_path):
    hb = write(
        tmp_path / "hb.csv",
        "Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"
        f'"{HARM}",standard,c1,,,b1\n"{HARM2}",contextual,c2,,"A placeholder context",b2\n',
    )
    out = tmp_path / "run"
    argv = ["eval", "--model", "m", "--backend", "openai", "--base-url", fake_openai.url, "--prompts", str(hb)]
    assert main([*argv, "--attacks", "none", "--judge", "keyword", "--max-new-tokens", "4", "--out", str(out)]) == 0
    sent = [p["messages"][-1]["content"] for _, _, p in fake_openai.requests]
    assert sorted(sent) == sorted([HARM, f"A placeholder context\n\n---\n\n{HARM2}"])
    prompts = [json.loads(line)["prompt"] for line in (out / "generations.jsonl").read_text().splitlines()]
    assert prompts == [HARM, f"A placeholder context\n\n---\n\n{HARM2}"]


def test_distill_reads_chat_prompts(tiny_dir, tmp_path):
    chat = jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]}],
    )
    out = tmp_path / "anchors.jsonl"
    argv = ["data", "distill", "--model", str(tiny_dir), "--prompts", str(chat), "--out", str(out)]
    # the tiny model's two-token answer is cut and dropped: distill keeping nothing stops (exit 2), after logging
    assert main([*argv, "--max-new-tokens", "2"]) in (0, 2)
    logged = [
        json.loads(line) for line in (tmp_path / "anchors.jsonl.parts" / "generations.jsonl").read_text().splitlines()
    ]
    assert [r["prompt"] for r in logged] == ["Name a fruit."]
