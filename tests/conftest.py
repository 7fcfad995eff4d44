"""Shared pytest setup: hypothesis profiles for the property-based tests.

``ci`` (the default) keeps the example budget small so the suite stays fast;
``HYPOTHESIS_PROFILE=dev pytest tests/test_properties.py`` runs many more examples
locally.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
