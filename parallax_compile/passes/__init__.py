"""Graph passes, in pipeline order: ``capture`` (torch.export) -> ``match`` (the catalogue of
attention forms, producing :class:`~.site.AttentionSite`) -> ``query_chain`` (from ``x`` to ``q``)
-> ``rewrite`` (probe ``W_R`` + ``parallax.attention``). ``parallax_compile.convert`` drives them
and verifies each rewrite numerically. ``graph_ops`` (inactive dropout, random ops, symbolic sizes)
and ``site`` are shared by all of them."""
