"""Student and teacher training: models, data, KD losses, pruning, and the Ray Train worker.

Everything except `worker.py` and `teacher_pool.py` is plain torch and runs without Ray.
"""
