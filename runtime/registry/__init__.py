"""Talking to image registries: the distribution API client, its authentication and transfers.

One job per module, dependencies running down the list:

* :mod:`.transfer` -- ``pull(store, ref)`` and ``push(store, source, dest)``: images between
  the store and a registry (over :mod:`runtime.image.exchange`), layers in parallel, progress;
* :mod:`.client` -- :class:`~.client.Registry`, the ``/v2/`` API of one registry: manifests
  and blobs, verified as they arrive; uploads (monolithic, chunked, cross-repository mount);
* :mod:`.auth` -- ``WWW-Authenticate`` challenges, basic credentials, bearer tokens;
* :mod:`.credentials` -- where logins come from (our auth file, docker's config, helpers);
* :mod:`.http` -- pooled HTTP(S) on ``http.client``: redirects, retries, bounded bodies.

Nothing is re-exported here: importing the package does not import the store or the network
code, so ``runtime.registry.credentials`` stays cheap for ``login``.
"""
