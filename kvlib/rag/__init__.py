"""The RAG pipeline, between the library and the engine.

- ingest (`Ingestor`): corpus -> chunker (retrieve/chunker.py: `chunk_document`) ->
  Engine.encode_many in one encoding -> drift score -> Library.put, with the vector index
  beside it. `Ingestor.store_pieces` is the KV part alone; the bench prepares its library
  with it, so there is one ingest.
- query (`QueryRunner`): question -> retrieve -> Library.get -> Engine.answer, the engine's
  one door; a chunk the library cannot serve is encoded on the spot and counted as computed.
- stack: opens the engine, library, index and embedder of one home.

rag/ calls engine/, store/ and retrieve/; nothing below it calls rag/.
"""
