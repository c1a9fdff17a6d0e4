"""The few-shot registry in Redis: its key layout and Lua scripts, the per-model stores, the embedded
Redis server. Imports :mod:`..classify`, never the core or the transports."""
