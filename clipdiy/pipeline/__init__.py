"""The Ray Data labelling job: storage, decoding, inference, writing, manifests."""
