"""Which slot of a layer's expert tensor holds whose expert.

Slots 0..M-1 are the base experts; adapters take the lowest free slots above them, so adapters
loaded one after another sit back to back and neighbours share the granule between them, and an
unload leaves a hole the next adapter fills first. A slot may have several owners (adapters whose
expert at that position is the same bytes): it is free again when its last owner releases it.
"""

from ..errors import CapacityError


class SlotAllocator:
    def __init__(self, num_base: int, num_adapter_slots: int):
        self.num_base = num_base
        self.owners: list[tuple[str, ...] | None] = [None] * num_adapter_slots

    @property
    def num_slots(self) -> int:
        return self.num_base + len(self.owners)

    @property
    def free_count(self) -> int:
        return self.owners.count(None)

    def choose(self, count: int, what: str) -> list[int]:
        """The slots allocate() would give, without taking them."""
        free = [self.num_base + i for i, owner in enumerate(self.owners) if owner is None]
        if count > len(free):
            raise CapacityError(f"{what} needs {count} adapter slots, {len(free)} of {len(self.owners)} are free")
        return free[:count]

    def take(self, owner: str, slots: list[int]) -> None:
        for slot in slots:
            assert self.owners[slot - self.num_base] is None, f"slot {slot} is taken"
            self.owners[slot - self.num_base] = (owner,)

    def share(self, owner: str, slots: list[int]) -> None:
        """Adds owner to slots another owner holds."""
        for slot in slots:
            owners = self.owners[slot - self.num_base]
            assert owners and owner not in owners, f"slot {slot} is free or already {owner}'s"
            self.owners[slot - self.num_base] = (*owners, owner)

    def give_back(self, slots: list[int]) -> None:
        for slot in slots:
            self.owners[slot - self.num_base] = None

    def release(self, owner: str) -> list[int]:
        """Drops owner from every slot it holds; returns the slots that became free."""
        freed = []
        for slot in self.slots_of(owner):
            rest = tuple(o for o in self.owners[slot - self.num_base] if o != owner)
            self.owners[slot - self.num_base] = rest or None
            if not rest:
                freed.append(slot)
        return freed

    def slots_of(self, owner: str) -> list[int]:
        return [self.num_base + i for i, o in enumerate(self.owners) if o and owner in o]

    def sharers(self, slot: int) -> int:
        """How many owners hold this slot."""
        return len(self.owners[slot - self.num_base] or ())
