"""The demo's documents: real English text, written for this repository and grown from templates.

Each document is a short hand-written introduction followed by entries generated from sentence
templates with a seeded random generator (the same text on every machine, nothing downloaded).
The entries carry concrete facts (names, numbers, dates) that the questions ask about, so the
model has something to read; what a 135M-parameter model answers is another matter, and the demo
only checks that kvcore does not change it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

SYSTEM_PROMPT = (
    "You are a careful assistant at a small regional archive. Visitors bring you documents from "
    "the archive's shelves and ask about them. Answer from the document in front of you, in two "
    "or three plain sentences. Quote names, dates and numbers exactly as the document gives them. "
    "If the document does not say, answer that it does not say, and do not invent anything. "
    "Be brief and polite, and never repeat the question back to the visitor."
)


@dataclass(frozen=True)
class Document:
    """A titled text and the questions a user asks about it, one per round."""

    title: str
    text: str
    questions: tuple[str, ...]


_NAMES = ["Ada Lindqvist", "Tomas Reyes", "Mirela Okafor", "Jonah Whitcombe", "Priya Raman",
          "Elias Brandt", "Noor Haddad", "Greta Solberg", "Samuel Achebe", "Ines Carvalho",
          "Oskar Ferrante", "Leila Moreau", "Hugo Tanaka", "Marta Kowalczyk", "Felix Adeyemi"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"]
_WINDS = ["north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west"]
_SKIES = ["a clear sky", "high thin cloud", "low grey cloud", "fog in the valley",
          "scattered showers", "steady rain", "a hard frost at dawn", "broken cloud and sun"]
_BIRDS = ["a pair of ravens", "a kestrel hunting over the scree", "a flock of fieldfares",
          "two buzzards circling", "a wren in the heather", "no birds at all"]


def _weather_station(rng: random.Random, entries: int) -> Document:
    intro = (
        "Kestrel Ridge Weather Station: Field Notes\n\n"
        "The station stands at 1,140 metres on the southern shoulder of Kestrel Ridge, a day's "
        "walk above the village of Hollin. It was built by the valley's farming cooperative after "
        "the flood year, when nobody in Hollin had measured how much rain had fallen on the hills "
        "before the river rose. Volunteers take turns to stay at the hut for a week. Each morning "
        "at eight they read the thermometers, the rain gauge and the anemometer, write a short "
        "entry in the log book, and carry the book down at the end of their week. What follows "
        "is a fair copy of one season's entries, with the volunteers' remarks kept as written.\n\n"
    )
    lines = []
    for day in range(1, entries + 1):
        month = _MONTHS[(day // 28 + 3) % 12]
        observer = rng.choice(_NAMES)
        low, span = rng.randint(-6, 9), rng.randint(3, 12)
        rain, wind = round(rng.uniform(0, 24), 1), rng.randint(2, 61)
        lines.append(
            f"Day {day}, {day % 28 + 1} {month}. Observer: {observer}. The overnight low was "
            f"{low} degrees and the afternoon high {low + span} degrees, under {rng.choice(_SKIES)}. "
            f"The gauge held {rain} millimetres of rain. Wind from the {rng.choice(_WINDS)} at "
            f"{wind} kilometres an hour{', gusting hard by noon' if wind > 40 else ''}. "
            f"Seen from the hut: {rng.choice(_BIRDS)}. "
            + rng.choice([
                "The path up from Hollin was dry and easy.",
                "Water was low in the tank; the observer carried two cans up from the spring.",
                "The door latch is stiff again and needs oil.",
                "Sheep grazed close to the mast all morning.",
                "A walking party from the coast stopped for tea and signed the visitors' book.",
                "The solar panel was cleaned of bird droppings.",
                "Snow lay in the north gullies and did not melt.",
            ])
        )
    questions = (
        "Where does the weather station stand, and who built it?",
        "Which observer wrote the entry for day 3, and how much rain fell that day?",
        "What do the volunteers do each morning at eight?",
    )
    return Document("Kestrel Ridge Weather Station", intro + "\n".join(lines), questions)


_PLANTS = [("runner bean", "Scarlet Emperor"), ("tomato", "Harbour Gold"), ("pea", "Early Lark"),
           ("carrot", "Long Meadow"), ("lettuce", "Winter Queen"), ("squash", "Copper Lantern"),
           ("onion", "Red Baron"), ("kale", "Black Tuscan"), ("beetroot", "Bull's Blood"),
           ("parsnip", "Tender and True"), ("broad bean", "Aquadulce"), ("radish", "French Breakfast"),
           ("leek", "Musselburgh"), ("cucumber", "Marketmore"), ("spinach", "Giant Winter")]
_SOILS = ["any well-drained soil", "deep, stone-free soil", "rich soil with plenty of compost",
          "light sandy soil", "heavy soil if it is dug well in autumn"]


def _seed_catalogue(rng: random.Random, entries: int) -> Document:
    intro = (
        "The Lindqvist Seed Company: Autumn Catalogue\n\n"
        "We have grown and saved seed on the same three fields outside Marsby since 1931. Every "
        "variety in this catalogue was sown, grown on and harvested by us this year, and every "
        "packet is tested for germination in our own shed before it leaves. Prices are per packet "
        "and include postage within the country. Orders placed before the first of November are "
        "sent within a week; after that date allow three weeks, as the whole family is busy "
        "cleaning seed. We do not sell treated seed, and we never have.\n\n"
    )
    lines = []
    for number in range(1, entries + 1):
        crop, variety = _PLANTS[(number - 1) % len(_PLANTS)]
        packet = rng.choice([20, 30, 50, 100, 200, 250])
        lines.append(
            f"Item {number:03d}: {crop}, '{variety}' (lot {rng.randint(100, 999)}). "
            f"{packet} seeds a packet, {rng.randint(2, 9)}.{rng.choice(['00', '50', '25', '75'])} "
            f"crowns. Sow from {rng.choice(_MONTHS)} to {rng.choice(_MONTHS)} in "
            f"{rng.choice(_SOILS)}, {rng.randint(1, 5)} centimetres deep and "
            f"{rng.randint(5, 60)} centimetres apart. Germination this year: "
            f"{rng.randint(78, 99)} percent. Grown for us by {rng.choice(_NAMES)}. "
            + rng.choice([
                "A reliable cropper in a cold spring.",
                "Our customers' favourite for the show bench.",
                "Stands well in the ground through winter.",
                "Sweet when young; pick often.",
                "Needs a net against pigeons.",
                "Keeps until spring in a cool, dark shed.",
            ])
        )
    questions = (
        "Since when has the Lindqvist Seed Company grown seed, and where?",
        "How many seeds come in a packet of item 002, and what does it cost?",
        "When should I order if I want my seeds within a week?",
    )
    return Document("Lindqvist Seed Catalogue", intro + "\n".join(lines), questions)


_MOTIONS = ["to repair the footbridge over the mill race", "to extend the library's opening hours",
            "to buy a second grit spreader for the winter", "to plant lime trees along Station Road",
            "to close the market square to cars on Saturdays", "to survey the old quarry for safety",
            "to raise the allotment rent by five percent", "to paint the bandstand",
            "to hire a part-time clerk for the cemetery", "to install a bench at the bus shelter"]


def _council_minutes(rng: random.Random, entries: int) -> Document:
    intro = (
        "Millbrook Town Council: Minutes of Ordinary Meetings\n\n"
        "The council meets on the first Tuesday of each month at seven in the evening, in the "
        "upper room of the Corn Exchange. Nine councillors sit; a meeting needs five of them "
        "present to make decisions. Members of the public may speak for up to three minutes at "
        "the start of each meeting on any matter on the agenda. These minutes are the clerk's "
        "record of what was decided. They are approved, with any corrections, at the following "
        "meeting, and the approved copy is kept in the Corn Exchange for anyone to read.\n\n"
    )
    lines = []
    for meeting in range(1, entries + 1):
        chair, mover = rng.sample(_NAMES, 2)
        for_, against = rng.randint(2, 8), rng.randint(0, 4)
        lines.append(
            f"Meeting {meeting}, first Tuesday of {_MONTHS[(meeting - 1) % 12]}. In the chair: "
            f"{chair}. Councillors present: {rng.randint(5, 9)}. Public speakers: "
            f"{rng.randint(0, 6)}. Councillor {mover} moved {rng.choice(_MOTIONS)}, at a cost of "
            f"{rng.randint(3, 95) * 100} crowns. The motion was "
            f"{'carried' if for_ > against else 'lost'}, {for_} votes to {against}. "
            + rng.choice([
                "The clerk reported that the accounts balance.",
                "A letter from the school about the crossing was read and noted.",
                "The meeting closed at nine minutes past nine.",
                "The footpath officer's report was deferred to the next meeting.",
                "Thanks were recorded to the volunteers who cleared the brook.",
            ])
        )
    questions = (
        "When and where does the Millbrook Town Council meet?",
        "Who chaired meeting 2, and was the motion carried?",
        "How long may a member of the public speak at a meeting?",
    )
    return Document("Millbrook Council Minutes", intro + "\n".join(lines), questions)


_TOOLS = ["the pillar drill", "the band saw", "the lathe", "the laser cutter", "the kiln",
          "the sewing machines", "the soldering benches", "the 3D printers"]


def _workshop_handbook(rng: random.Random, entries: int) -> Document:
    intro = (
        "Harbour Street Workshop: Members' Handbook\n\n"
        "The workshop is a shared space for people who make and mend things. It is run by its "
        "members and paid for by their subscriptions, which are twelve crowns a month. It is open "
        "from ten in the morning until ten at night every day except Mondays. Before you use a "
        "machine you must be signed off on it by one of the stewards listed below; a sign-off "
        "takes about an hour and is free. Clean up after yourself, put tools back where you found "
        "them, and report anything broken on the board by the door.\n\n"
    )
    lines = []
    for n in range(1, entries + 1):
        tool = _TOOLS[(n - 1) % len(_TOOLS)]
        steward = rng.choice(_NAMES)
        lines.append(
            f"Rule {n}: {tool}. Steward: {steward}. Sign-off sessions on "
            f"{rng.choice(['Tuesdays', 'Wednesdays', 'Thursdays', 'Saturdays', 'Sundays'])} at "
            f"{rng.randint(1, 8)} in the afternoon, {rng.randint(2, 6)} members at a time. "
            f"Wear {rng.choice(['safety glasses', 'ear defenders', 'a dust mask', 'gloves'])}. "
            f"Book no more than {rng.randint(1, 4)} hours at a time. "
            + rng.choice([
                "Never leave it running unattended.",
                "Empty the dust bag when it is half full.",
                "Blades are replaced by the steward only.",
                "Write your name and the time in the log before you start.",
                "Switch it off at the wall when you finish.",
            ])
        )
    questions = (
        "How much does membership of the workshop cost, and when is it open?",
        "Who is the steward for rule 1, and when are the sign-off sessions?",
        "What must I do before I use a machine?",
    )
    return Document("Harbour Street Workshop Handbook", intro + "\n".join(lines), questions)


_BUILDERS: list[tuple[Callable[[random.Random, int], Document], int]] = [
    (_weather_station, 24),
    (_seed_catalogue, 40),
    (_council_minutes, 26),
    (_workshop_handbook, 60),
]
"""Document builders and their entry counts (documents of 2-4K SmolLM2 tokens)."""


def documents(count: int = 4, scale: float = 1.0, seed: int = 7) -> list[Document]:
    """``count`` documents (cycling through the four kinds), entries scaled by ``scale``."""
    out = []
    for i in range(count):
        build, entries = _BUILDERS[i % len(_BUILDERS)]
        out.append(build(random.Random(seed * 1000 + i), max(1, round(entries * scale))))
    return out
