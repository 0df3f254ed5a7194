from pipeline.training.dpo import completion_columns


def test_answers_are_cut_after_the_prompt_and_keep_their_end_of_turn_token():
    ids = {"prompt_ids": [1, 5, 6], "chosen_ids": [1, 5, 6, 7, 8, 2], "rejected_ids": [1, 5, 6, 9, 2]}
    assert completion_columns(ids) == {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]}

