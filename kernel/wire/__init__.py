"""The wire format: msgpack frames (`codec`), tensor records (`tensorwire`) and lossy stages
(`stages`). It imports nothing of the runner, so a transport can carry frames without a run."""
