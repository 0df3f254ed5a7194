import torch

from pipeline.training.dpo import chosen_entropy, completion_columns


def test_answers_are_cut_after_the_prompt_and_keep_their_end_of_turn_token():
    ids = {"prompt_ids": [1, 5, 6], "chosen_ids": [1, 5, 6, 7, 8, 2], "rejected_ids": [1, 5, 6, 9, 2]}
    assert completion_columns(ids) == {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]}



def test_the_entropy_term_averages_the_chosen_halfs_answer_tokens_only():
    # TRL's batch is [chosen; rejected]: rows 0-1 chosen, 2-3 rejected. Chosen answer tokens:
    # row 0 entropies 1.0 and 2.0, row 1 entropy 3.0 -> (1 + 2 + 3) / 3 = 2.0; the rejected rows'
    # 10.0 and the masked 7.0 never count.
    entropy = torch.tensor([[7.0, 1.0, 2.0], [7.0, 7.0, 3.0], [10.0, 10.0, 10.0], [10.0, 10.0, 10.0]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    assert chosen_entropy(entropy, mask).item() == 2.0
