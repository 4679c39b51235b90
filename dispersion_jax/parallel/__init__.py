"""Devices and processes: backend choice, the mesh and sharding rules, multi-process start-up, child lifetime."""
