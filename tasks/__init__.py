"""tasks: the data and metrics both scripts share (INTERFACE DRAFT: the tasks issue implements it).

Every dataset becomes plain Python lists of dicts; the scripts never see a loader class.

Instruction data (causal LM: FedKSeed --dataset dolly|instruct, FedCyBGD --task sft):

    data = tasks.load_instruction_data(name, data_path=None, num_clients=200, iid="dir0.5", seed=42)
        name: "dolly" | "instruct" | "alpaca_gpt4_en"
        data.clients: list over clients of lists of examples (the federated training split)
        data.test:    list of held-out examples (dolly: one whole category; instruct: the test tasks)
        data.summary: a printable table of client sizes and label mix
        example = {"prompt": str (template filled in), "target": str (response, no EOS), "category": str}
    t = tasks.tokenize_example(tokenizer, example, max_length)
        -> {"input_ids": list[int], "labels": list[int] (-100 on prompt tokens), "truncated": bool}
    batch = tasks.collate(list_of_t, pad_token_id)
        -> {"input_ids": LongTensor[B, T], "attention_mask": LongTensor[B, T], "labels": LongTensor[B, T]}
    tasks.generate(model, tokenizer, prompts, max_new_tokens=128, batch_size=8) -> list[str]  (greedy)
    tasks.rouge_l(predictions, references) -> float  (mean per-sample Rouge-L F-measure, 0 for empty)

GLUE (tasks.glue), SQuAD v1.1 (tasks.squad), partitions (tasks.partition): see their modules.
Errors a user can cause raise tasks.DataError with a one-line message.
"""
