"""Decode backends behind the Loader protocol: ``cpu`` (the reference), ``dali``,
``ffcv`` and ``synthetic``; ``base.DecodedBatch`` is what each hands over."""
