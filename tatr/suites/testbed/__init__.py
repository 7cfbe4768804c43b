"""The embedded CPU testbed: generated data (`data`, `render`), a tiny open_clip ViT pretrained and
fine-tuned on eight tasks (`build`), behind the `Suite` interface (`suite`). Importing the package
registers the suite as `testbed`."""

from tatr.suites.testbed.suite import BUILD_VERSION, Testbed, make_testbed, spec_from_options, spec_key

__all__ = ["BUILD_VERSION", "Testbed", "make_testbed", "spec_from_options", "spec_key"]
