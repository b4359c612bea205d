"""The operator workflows after a run, one module each (migration usage guide,
"Operational sequence", steps 6-7):

* :mod:`.failures` -- export every Failed key (``shardmove failures``);
* :mod:`.verify` -- post-verify a seeded sample of moved and unmoved keys;
* :mod:`.rollback` -- reverse migration of the plan's Done keys;
* :mod:`.cleanup` -- delete leftover copies once the verification window passed;
* :mod:`.catchup` -- plan the keys written since an earlier plan's snapshot.

:mod:`._common` holds what they share.  The public names are gathered in
:mod:`shardmove.ops`; this package imports none of its modules itself.
"""
