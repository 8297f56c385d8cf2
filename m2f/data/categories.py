"""Categories and the one place where category ids meet contiguous class indices.

The contiguous class index k in [0, K) of a category is its position in the categories sorted by
category id (COCO's ids are not contiguous: 1..90 for 80 things, up to 200 for 133 panoptic
classes). Index K is "no object" in classifier outputs. Instance-only targets use the thing
categories alone (`Categories.things()`), so K = 80 on COCO instance and 8 on Cityscapes instance.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m2f.data.errors import DatasetError


@dataclass(frozen=True)
class Category:
    """One category as in a COCO panoptic `categories` entry.

    Args:
        id: the dataset's category id (any non-negative int; not contiguous in general).
        name: class name.
        isthing: countable object (instance-level) or amorphous stuff region.
        supercategory: coarser group name.
        color: RGB colour for visualisation.
    """

    id: int
    name: str
    isthing: bool
    supercategory: str = ""
    color: tuple[int, int, int] = (0, 0, 0)

    def to_coco(self) -> dict[str, Any]:
        """The COCO panoptic JSON form of this category."""
        return {"id": self.id, "name": self.name, "supercategory": self.supercategory,
                "isthing": int(self.isthing), "color": list(self.color)}


class Categories:
    """An ordered set of categories with the id <-> contiguous index maps.

    Args:
        categories: the categories in any order; they are sorted by id.

    Raises:
        ValueError: empty or duplicated ids.
    """

    def __init__(self, categories: Sequence[Category]):
        if not categories:
            raise ValueError("a dataset needs at least one category")
        self.categories: tuple[Category, ...] = tuple(sorted(categories, key=lambda c: c.id))
        ids = [c.id for c in self.categories]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicated category ids {duplicates}")
        self._index = {c.id: k for k, c in enumerate(self.categories)}

    @classmethod
    def from_coco(cls, entries: Any, *, file: str | Path, default_isthing: bool | None = None) -> "Categories":
        """Parse a COCO `categories` list.

        Args:
            entries: the decoded `categories` value.
            file: the JSON file, named in errors.
            default_isthing: value for entries without "isthing" (True for instance JSON files,
                which list things only); None makes "isthing" required (panoptic JSON files).

        Raises:
            DatasetError: not a list, missing "id"/"name"/"isthing", bad id, duplicated id.
        """
        if not isinstance(entries, list) or not entries:
            raise DatasetError(file, "not a COCO file: 'categories' must be a non-empty list")
        parsed = []
        for k, entry in enumerate(entries):
            if not isinstance(entry, dict) or "id" not in entry or "name" not in entry:
                raise DatasetError(file, f"not a COCO file: categories[{k}] needs 'id' and 'name'")
            if "isthing" not in entry and default_isthing is None:
                raise DatasetError(file, f"not a COCO panoptic file: categories[{k}] has no key 'isthing'")
            if not isinstance(entry["id"], int) or isinstance(entry["id"], bool) or entry["id"] < 0:
                raise DatasetError(file, f"bad category: categories[{k}] has id {entry['id']!r}")
            color = entry.get("color") or (0, 0, 0)
            parsed.append(Category(id=entry["id"], name=str(entry["name"]),
                                   isthing=bool(entry.get("isthing", default_isthing)),
                                   supercategory=str(entry.get("supercategory", "")),
                                   color=(int(color[0]), int(color[1]), int(color[2]))))
        try:
            return cls(parsed)
        except ValueError as err:
            raise DatasetError(file, f"bad categories: {err}") from err

    def __len__(self) -> int:
        return len(self.categories)

    def __iter__(self) -> Iterator[Category]:
        return iter(self.categories)

    def __contains__(self, category_id: object) -> bool:
        return category_id in self._index

    def __repr__(self) -> str:
        return f"Categories({len(self)}: {', '.join(f'{c.id}={c.name}' for c in self.categories[:6])}...)"

    @property
    def num_classes(self) -> int:
        """K, the number of classes (the classifier has K + 1 outputs)."""
        return len(self.categories)

    @property
    def ids(self) -> list[int]:
        """Category ids in index order."""
        return [c.id for c in self.categories]

    @property
    def names(self) -> list[str]:
        """Class names in index order."""
        return [c.name for c in self.categories]

    @property
    def isthing(self) -> list[bool]:
        """Thing flag per class index."""
        return [c.isthing for c in self.categories]

    def index(self, category_id: int) -> int:
        """Contiguous index of a category id.

        Raises:
            KeyError: unknown id (the message lists the known ids).
        """
        try:
            return self._index[category_id]
        except KeyError:
            raise KeyError(f"unknown category_id {category_id!r}; known ids {self.ids}") from None

    def category_id(self, index: int) -> int:
        """Category id of a contiguous index (for writing predictions in COCO format)."""
        return self.categories[index].id

    def things(self) -> "Categories":
        """The thing categories alone (the label space of instance segmentation)."""
        return Categories([c for c in self.categories if c.isthing])

    def to_coco(self) -> list[dict[str, Any]]:
        """The COCO panoptic `categories` list (sorted by id)."""
        return [c.to_coco() for c in self.categories]
