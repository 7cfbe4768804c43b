"""The paper's benchmark: open_clip ViTs on the eight task_vectors datasets (`data`, `splits`,
`templates`), their zero-shot heads (`heads`) and checkpoints in any of the published layouts
(`checkpoints`, `convert`, `hf_folder`), behind the `Suite` interface (`suite`). Importing the
package registers the suite as `clip8`."""

from tatr.suites.clip8.suite import Clip8, Clip8Options, ImageEncoder, make_clip8, parse_options

__all__ = ["Clip8", "Clip8Options", "ImageEncoder", "make_clip8", "parse_options"]
