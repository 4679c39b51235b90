"""The data settings of a run (the `data` section of the run config is generated from this dataclass).

`seq_len`, `seed` and `tokenizer` are run-level settings; the data layer takes them as arguments.
- text_dir: files are read in sorted order of their relative paths (hidden files skipped). Files named like a
  split (`validation-00000-of-00001.parquet`, `validation/x.jsonl`) are the validation set and `train` ones (or,
  without any, all others) the training set; with no such files (or validation_split=""), documents with
  `corpus.doc_hash(id) < 0.02` are held out. A `.txt` file is one document (with doc_grouping=wikitext its lines
  are the rows).
- tfds: splits "train" and `validation_split` ("" = hash-split train); wikitext grouping needs rows in order
  (a dataset prepared with disable_shuffling).
- The cache: <cache_dir or data_dir or TFDS default>/dispersion_packed/ (see data/packed.py), a local path or
  gs://; a build into a bucket writes locally first (staging_dir) and uploads the finished dataset.
"""

import dataclasses

from dispersion_jax.errors import ConfigError

SOURCES = ("default", "text_dir", "tfds")
DOC_GROUPINGS = ("row", "wikitext")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "default"  # default (embedded corpus, built on first use) | text_dir | tfds
  text_dir: str = ""  # text_dir: dir (recursive) or glob of .parquet/.jsonl/.txt files
  tfds_name: str = ""  # tfds: an ArrayRecord dataset in data_dir, e.g. wikitext/wikitext-103-raw-v1
  text_key: str = "text"  # the document text: parquet column, jsonl field or TFDS feature
  data_dir: str | None = None  # TFDS data dir (tfds inputs; caches unless cache_dir); None = TFDS default
  cache_dir: str | None = None  # where built datasets and their token files go (or gs://); None = data_dir
  staging_dir: str | None = None  # a gs:// cache: local dir the build writes before uploading; None = system tmp
  validation_split: str = "validation"  # TFDS split or file split (validation-*.parquet); "" = 2% by doc hash
  doc_grouping: str = "row"  # row: a row/line/file is a document; wikitext: join rows at " = Title = "
  build_workers: int = 0  # build processes: 0 = one per CPU core, 1 = this process; same output
  read_threads: int = 4  # threads reading ahead of the step (0 = none); never change the order

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ConfigError(f"data.source={self.source!r}: use one of {', '.join(SOURCES)}")
    if self.doc_grouping not in DOC_GROUPINGS:
      raise ConfigError(f"data.doc_grouping={self.doc_grouping!r}: use one of {', '.join(DOC_GROUPINGS)}")
    if self.source == "default" and self.doc_grouping != "row":
      raise ConfigError(
          "data.doc_grouping applies to text_dir and tfds inputs; the default corpus has its own "
          "documents: remove data.doc_grouping or set data.source"
      )
    if not self.text_key:
      raise ConfigError("data.text_key must name the text column / field / feature (e.g. text)")
    if self.build_workers < 0:
      raise ConfigError(f"data.build_workers={self.build_workers} must be >= 0 (0 = one per CPU core)")
    if self.read_threads < 0:
      raise ConfigError(f"data.read_threads={self.read_threads} must be >= 0 (0 = read in the training thread)")

  @classmethod
  def from_dict(cls, values: dict) -> "DataConfig":
    """A DataConfig from a mapping; obsolete and unknown keys are a ConfigError naming the key."""
    obsolete = {
        "shards": "global batches no longer depend on the process count",
        "worker_count": "reading uses threads now: set data.read_threads",
    }
    for key in values:
      if key in obsolete:
        raise ConfigError(f"data.{key} is obsolete ({obsolete[key]}); remove it")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"data.{unknown[0]} is not a data setting; use one of {', '.join(sorted(known))}")
    return cls(**values)
