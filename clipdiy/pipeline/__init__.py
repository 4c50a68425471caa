"""The Ray Data labelling job: listing, planning, decoding, inference, writing, manifests, the lock."""
