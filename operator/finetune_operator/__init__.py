"""The finetune-operator controller: FineTuneJob resources in, batch/v1 Jobs and status out."""
