"""The text suite: a Hugging Face sentence encoder (`model`), task files (`tasks`), the build of its
fine-tunes (`build`) and the embedded fortunes tasks (`fortunes`, `fortunes_card`), behind the `Suite`
interface (`suite`). Importing the package registers the suite as `text`."""

from tatr.suites.text.suite import TextSpec, TextSuite, make_text, spec_from_options

__all__ = ["TextSpec", "TextSuite", "make_text", "spec_from_options"]
