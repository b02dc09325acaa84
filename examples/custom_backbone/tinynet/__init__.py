"""A user's package: a plain backbone (no embed/head: graceful adds the projection and the
cosine head) and a generated image set with its own splits."""
