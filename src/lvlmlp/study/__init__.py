"""Studies: the experiment config and runner (`lvlmlp run`), its analyses, reports and finetuning vs probing."""
