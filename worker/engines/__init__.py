"""Inference engines behind one interface (:class:`worker.engines.base.Engine`)."""
