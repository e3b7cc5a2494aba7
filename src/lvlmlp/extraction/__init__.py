"""Extraction: the model backend (and each family's quirks), batch preparation, the extractor, the run-folder store, legacy import, CLIP features and Ray scale-out."""
