"""Distributed inference on torch.distributed: tensor parallel (one model split across
processes, ``tp.py`` + ``worker.py``) and data parallel (engine replicas behind one server,
``dp.py``). Backend gloo on CPU, NCCL on CUDA."""
