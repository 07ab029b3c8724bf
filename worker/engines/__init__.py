"""Inference engines behind one interface (:class:`tokenspool.worker.engines.base.Engine`)."""
