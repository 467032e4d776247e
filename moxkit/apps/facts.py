"""Facts a pretrained model already knows, and the probes that tell what unlearning them cost.

Unlearning knowledge a model picked up in pretraining (the "hazardous knowledge" setting) needs
no fine-tuning first: a few hundred short completions written here ("The capital of France is"
-> "Paris"), checked against the model and kept only where it already answers them, then split
into facts to forget and facts to keep. Prompts are plain completions, not chat turns: a dozen
tokens each, which is what makes CPU runs on a 135M model affordable, and the answer is the very
next thing the model says, so one forward pass scores it (teacher-forced greedy match = the
greedy answer starts with it). General ability is measured apart from the facts: the mean token
NLL of a fixed general text written here, and a few chat questions answered greedily.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..eval.generation import greedy_answers
from ..text import pad_id

# "subject|answer" pairs; a category's template turns the subject into the prompt
_CAPITALS = """\
France|Paris; Germany|Berlin; Italy|Rome; Spain|Madrid; Portugal|Lisbon;
the United Kingdom|London; Ireland|Dublin; Belgium|Brussels; the Netherlands|Amsterdam;
Austria|Vienna; Switzerland|Bern; Poland|Warsaw; the Czech Republic|Prague; Hungary|Budapest;
Greece|Athens; Sweden|Stockholm; Norway|Oslo; Denmark|Copenhagen; Finland|Helsinki;
Iceland|Reykjavik; Russia|Moscow; Ukraine|Kyiv; Romania|Bucharest; Bulgaria|Sofia;
Serbia|Belgrade; Croatia|Zagreb; Turkey|Ankara; Egypt|Cairo; Kenya|Nairobi; Nigeria|Abuja;
Ethiopia|Addis Ababa; Morocco|Rabat; South Africa|Pretoria; Ghana|Accra; Japan|Tokyo;
China|Beijing; South Korea|Seoul; North Korea|Pyongyang; India|New Delhi; Pakistan|Islamabad;
Bangladesh|Dhaka; Thailand|Bangkok; Vietnam|Hanoi; Indonesia|Jakarta; the Philippines|Manila;
Malaysia|Kuala Lumpur; Iran|Tehran; Iraq|Baghdad; Saudi Arabia|Riyadh; Israel|Jerusalem;
Afghanistan|Kabul; Nepal|Kathmandu; Australia|Canberra; New Zealand|Wellington; Canada|Ottawa;
the United States|Washington; Mexico|Mexico City; Cuba|Havana; Brazil|Brasilia;
Argentina|Buenos Aires; Chile|Santiago; Peru|Lima; Colombia|Bogota; Venezuela|Caracas;
Ecuador|Quito; Uruguay|Montevideo; Syria|Damascus; Lebanon|Beirut; Jordan|Amman; Qatar|Doha;
Sri Lanka|Colombo; Mongolia|Ulaanbaatar; Scotland|Edinburgh; Wales|Cardiff; Latvia|Riga;
Lithuania|Vilnius; Estonia|Tallinn; Slovakia|Bratislava; Slovenia|Ljubljana; Albania|Tirana;
Cyprus|Nicosia; Malta|Valletta; Luxembourg|Luxembourg; Algeria|Algiers; Tunisia|Tunis;
Libya|Tripoli; Sudan|Khartoum; Uganda|Kampala; Tanzania|Dodoma; Zimbabwe|Harare; Senegal|Dakar;
Jamaica|Kingston; Bolivia|La Paz; Paraguay|Asuncion; Panama|Panama City; Costa Rica|San Jose;
Taiwan|Taipei; Singapore|Singapore; Cambodia|Phnom Penh; Myanmar|Naypyidaw; Kazakhstan|Astana;
Uzbekistan|Tashkent; Georgia|Tbilisi; Armenia|Yerevan; Azerbaijan|Baku; Belarus|Minsk;
Moldova|Chisinau"""
_ELEMENTS = """\
gold|Au; silver|Ag; iron|Fe; copper|Cu; sodium|Na; potassium|K; oxygen|O; hydrogen|H; carbon|C;
nitrogen|N; helium|He; lead|Pb; tin|Sn; mercury|Hg; calcium|Ca; chlorine|Cl; sulfur|S; zinc|Zn;
neon|Ne; uranium|U; magnesium|Mg; aluminium|Al; silicon|Si; phosphorus|P; fluorine|F;
lithium|Li; nickel|Ni; platinum|Pt; tungsten|W; iodine|I; argon|Ar; boron|B; titanium|Ti;
cobalt|Co; chromium|Cr; manganese|Mn; radon|Rn; xenon|Xe"""
_AUTHORS = """\
Pride and Prejudice|Jane Austen; Hamlet|William Shakespeare;
Romeo and Juliet|William Shakespeare; Macbeth|William Shakespeare; War and Peace|Leo Tolstoy;
Anna Karenina|Leo Tolstoy; Crime and Punishment|Fyodor Dostoevsky;
The Brothers Karamazov|Fyodor Dostoevsky; Nineteen Eighty-Four|George Orwell;
Animal Farm|George Orwell; Moby-Dick|Herman Melville; The Great Gatsby|F. Scott Fitzgerald;
To Kill a Mockingbird|Harper Lee; The Catcher in the Rye|J. D. Salinger;
Don Quixote|Miguel de Cervantes; The Odyssey|Homer; The Iliad|Homer;
Oliver Twist|Charles Dickens; Great Expectations|Charles Dickens;
A Tale of Two Cities|Charles Dickens; David Copperfield|Charles Dickens;
Frankenstein|Mary Shelley; Dracula|Bram Stoker; Ulysses|James Joyce;
The Old Man and the Sea|Ernest Hemingway; A Farewell to Arms|Ernest Hemingway;
Brave New World|Aldous Huxley; Jane Eyre|Charlotte Bronte; Wuthering Heights|Emily Bronte;
Les Miserables|Victor Hugo; The Hobbit|J. R. R. Tolkien;
The Lord of the Rings|J. R. R. Tolkien; Harry Potter and the Philosopher's Stone|J. K. Rowling;
The Adventures of Tom Sawyer|Mark Twain; Adventures of Huckleberry Finn|Mark Twain;
Emma|Jane Austen; Sense and Sensibility|Jane Austen; The Divine Comedy|Dante Alighieri;
Faust|Johann Wolfgang von Goethe; One Hundred Years of Solitude|Gabriel Garcia Marquez;
The Origin of Species|Charles Darwin; The Communist Manifesto|Karl Marx; The Republic|Plato;
The Prince|Niccolo Machiavelli; Alice's Adventures in Wonderland|Lewis Carroll;
The Picture of Dorian Gray|Oscar Wilde; The Grapes of Wrath|John Steinbeck;
Of Mice and Men|John Steinbeck; Lord of the Flies|William Golding; Fahrenheit 451|Ray Bradbury;
The Time Machine|H. G. Wells; The War of the Worlds|H. G. Wells;
Treasure Island|Robert Louis Stevenson; Robinson Crusoe|Daniel Defoe;
Gulliver's Travels|Jonathan Swift; The Canterbury Tales|Geoffrey Chaucer;
Madame Bovary|Gustave Flaubert; The Metamorphosis|Franz Kafka; The Trial|Franz Kafka;
Little Women|Louisa May Alcott; The Little Prince|Antoine de Saint-Exupery;
Twenty Thousand Leagues Under the Seas|Jules Verne;
Around the World in Eighty Days|Jules Verne; The Count of Monte Cristo|Alexandre Dumas;
The Three Musketeers|Alexandre Dumas; Sherlock Holmes|Arthur Conan Doyle;
The Raven|Edgar Allan Poe; Leaves of Grass|Walt Whitman; Beloved|Toni Morrison;
The Shining|Stephen King; Murder on the Orient Express|Agatha Christie;
The Da Vinci Code|Dan Brown; A Brief History of Time|Stephen Hawking"""
_CURRENCIES = """\
Japan|yen; the United Kingdom|pound; India|rupee; China|yuan; Russia|ruble; Mexico|peso;
Switzerland|franc; South Korea|won; Brazil|real; Poland|zloty; Turkey|lira; Sweden|krona;
Thailand|baht; South Africa|rand; Israel|shekel; Vietnam|dong; Indonesia|rupiah;
the United States|dollar; Germany|euro"""
_LANGUAGES = """\
Brazil|Portuguese; Mexico|Spanish; Argentina|Spanish; Egypt|Arabic; Japan|Japanese;
Germany|German; France|French; Italy|Italian; Russia|Russian; China|Chinese; Greece|Greek;
Turkey|Turkish; Poland|Polish; Sweden|Swedish; the Netherlands|Dutch; Iran|Persian;
Israel|Hebrew; Thailand|Thai; Vietnam|Vietnamese; South Korea|Korean; Finland|Finnish;
Hungary|Hungarian; Portugal|Portuguese; Norway|Norwegian"""
_MISC = """\
The largest planet in the solar system is|Jupiter; The planet closest to the Sun is|Mercury;
The planet known as the Red Planet is|Mars; The largest ocean on Earth is the|Pacific;
The longest river in Africa is the|Nile; The tallest mountain in the world is Mount|Everest;
The largest desert in the world is the|Sahara; The chemical formula for water is|H2O;
The freezing point of water in degrees Celsius is|0;
The boiling point of water in degrees Celsius is|100; The number of days in a week is|seven;
The number of continents on Earth is|seven; The number of legs a spider has is|eight;
The first man to walk on the Moon was Neil|Armstrong;
The theory of relativity was developed by Albert|Einstein;
The Mona Lisa was painted by Leonardo da|Vinci;
The Sistine Chapel ceiling was painted by|Michelangelo;
The Starry Night was painted by Vincent van|Gogh;
The composer of the Moonlight Sonata was Ludwig van|Beethoven;
The Magic Flute was composed by Wolfgang Amadeus|Mozart;
The first President of the United States was George|Washington;
The telephone was invented by Alexander Graham|Bell;
The light bulb is usually credited to Thomas|Edison;
Penicillin was discovered by Alexander|Fleming;
The laws of motion were formulated by Isaac|Newton;
The theory of evolution by natural selection was proposed by Charles|Darwin;
The Eiffel Tower is in the city of|Paris; The Colosseum is in the city of|Rome;
The Statue of Liberty is in the city of New|York; The Great Wall is in the country of|China;
The Taj Mahal is in the country of|India; The pyramids of Giza are in|Egypt;
Big Ben is in the city of|London; The Kremlin is in the city of|Moscow;
The Acropolis is in the city of|Athens; The largest country in the world by area is|Russia;
The smallest planet in the solar system is|Mercury; The hardest natural substance is|diamond;
The gas plants absorb from the air is carbon|dioxide; The closest star to Earth is the|Sun;
The natural satellite of the Earth is the|Moon; The fastest land animal is the|cheetah;
The largest mammal in the world is the blue|whale;
The animal known as the king of the jungle is the|lion; A baby cat is called a|kitten;
A baby dog is called a|puppy; A baby cow is called a|calf;
The color of the sky on a clear day is|blue; The color of grass is|green;
The color of a ripe banana is|yellow; The opposite of hot is|cold; The opposite of up is|down;
The opposite of day is|night; The opposite of black is|white; The square root of 81 is|9;
Two plus two equals|four; Ten times ten equals|100; The number of sides of a triangle is|three;
The number of sides of a hexagon is|six; The number of minutes in an hour is|60;
The number of hours in a day is|24; The number of months in a year is|12;
The currency used in most of the European Union is the|euro;
The Olympic Games originated in ancient|Greece;
The author of the Harry Potter books is J. K.|Rowling;
The inventor of the World Wide Web is Tim Berners-|Lee; The founder of Microsoft is Bill|Gates;
The company that makes the iPhone is|Apple;
The organ that pumps blood through the body is the|heart;
The organ used for breathing is the|lungs; The largest organ of the human body is the|skin;
The number of bones in the adult human body is|206; Honey is made by|bees;
Frogs begin life as|tadpoles; The study of living things is called|biology;
The study of the stars and planets is called|astronomy;
The instrument used to measure temperature is a|thermometer;
The first month of the year is|January; The last month of the year is|December;
The season after winter is|spring; The Amazon rainforest is mostly in|Brazil;
The river that flows through London is the|Thames;
The river that flows through Paris is the|Seine;
The river that flows through Egypt is the|Nile; The language spoken in ancient Rome was|Latin;
The Declaration of Independence was mainly written by Thomas|Jefferson;
The ship that sank in 1912 after hitting an iceberg was the|Titanic;
World War II ended in the year|1945; The Berlin Wall fell in the year|1989;
The French Revolution began in the year|1789;
Christopher Columbus reached the Americas in|1492"""

_TEMPLATES = {
    "capital": ("_CAPITALS", "The capital of {} is"),
    "element": ("_ELEMENTS", "The chemical symbol for {} is"),
    "author": ("_AUTHORS", "{} was written by"),
    "currency": ("_CURRENCIES", "The currency of {} is the"),
    "language": ("_LANGUAGES", "The main language spoken in {} is"),
    "misc": ("_MISC", "{}"),
}

# ordinary prose on subjects the facts do not touch: its perplexity tracks fluency
GENERAL_TEXT = (
    "The kitchen was warm and smelled of bread. Every morning the baker rose before dawn, mixed "
    "flour, water and salt, and left the dough to rest while the ovens heated.",
    "Regular exercise strengthens the heart and muscles, improves sleep and lifts the mood. "
    "Even a short walk after dinner can make a noticeable difference over a few weeks.",
    "When you write a letter to a friend, begin with a greeting, share a little news, ask how "
    "they are doing, and close with a warm wish for their health and happiness.",
    "The children ran across the field to the old oak tree, where they had built a small hut "
    "out of branches and leaves during the long summer holidays.",
    "A good recipe lists the ingredients in the order they are used. Read it through before you "
    "start, so that nothing is missing when the pan is already hot.",
    "To plant a tree, dig a hole twice as wide as its roots, set the tree at the same depth it "
    "grew before, fill the hole with soil and water it well.",
    "Learning a musical instrument takes patience. Most teachers recommend practising a little "
    "every day rather than for many hours once a week.",
    "She opened the window, looked out over the quiet harbour and watched the fishing boats "
    "return slowly with the evening tide.",
)

# (chat question, words one of which a correct answer contains); topics the facts avoid
CHAT_PROBES = (
    ("Which animal says meow?", ("cat",)),
    ("What is the plural of mouse?", ("mice",)),
    ("What is frozen water called?", ("ice",)),
    ("How many wheels does a bicycle have?", ("two", "2")),
)


@dataclass(frozen=True)
class Fact:
    category: str
    prompt: str
    answer: str

    def row(self) -> dict:
        """As the trainer reads it: the prompt is masked, the answer (and EOS) trained."""
        return {"prompt": self.prompt, "completion": self.answer}


@dataclass(frozen=True)
class FactScore:
    logprob: float  # log p(answer tokens | prompt), EOS excluded
    tokens: int
    correct: bool  # every answer token is the model's argmax: its greedy answer starts so


def candidate_facts() -> list[Fact]:
    """Every fact written here, in a fixed order."""
    facts = []
    for category, (block, template) in _TEMPLATES.items():
        for entry in globals()[block].replace("\n", " ").split(";"):
            subject, answer = (part.strip() for part in entry.split("|"))
            facts.append(Fact(category, template.format(subject), answer))
    return facts


@torch.inference_mode()
def score_facts(model, tokenizer, facts: Sequence[Fact], batch_size: int = 64) -> list[FactScore]:
    """One teacher-forced forward pass per batch (moxkit.matching.answer_token_logprobs, the
    scoring matched forgetting reads): each answer's log-probability and whether greedy
    decoding would produce it."""
    from ..matching import answer_token_logprobs

    out = []
    batches = answer_token_logprobs(model, tokenizer, [f.prompt for f in facts],
                                    [f.answer for f in facts], batch_size=batch_size)  # fmt: skip
    for logp, target, scored, chosen in batches:
        hit = (logp.argmax(-1) == target) | ~scored
        for row in range(len(target)):
            out.append(
                FactScore(
                    float(chosen[row][scored[row]].sum()),
                    int(scored[row].sum()),
                    bool(hit[row].all()),
                )
            )
    return out


def _padded(rows: Sequence[Sequence[int]], fill: int, width: int | None = None) -> torch.Tensor:
    """Rows right-padded with `fill` to `width` (default: the longest row)."""
    out = torch.full((len(rows), width or max(map(len, rows))), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def known_facts(model, tokenizer, facts: Sequence[Fact] | None = None) -> list[Fact]:
    """The facts the model answers correctly (greedy), in their given order."""
    facts = candidate_facts() if facts is None else list(facts)
    return [
        f for f, s in zip(facts, score_facts(model, tokenizer, facts), strict=True) if s.correct
    ]


def split_facts(facts: Sequence[Fact], sizes: dict[str, int], seed: int = 0) -> dict[str, list]:
    """Disjoint named splits of the given sizes, drawn by a seeded shuffle and stratified by
    category: each fact goes to the split where its category is rarest so far, so the splits
    hold the categories in the same proportions."""
    if sum(sizes.values()) > len(facts):
        raise ValueError(f"{sum(sizes.values())} facts requested, {len(facts)} available")
    shuffled = random.Random(seed).sample(list(facts), len(facts))
    splits: dict[str, list[Fact]] = {name: [] for name in sizes}
    for fact in shuffled:  # to the split with the smallest share of this category so far
        short = [n for n in sizes if len(splits[n]) < sizes[n]]
        if not short:
            break
        name = min(
            short,
            key=lambda n: (
                sum(f.category == fact.category for f in splits[n]) / sizes[n],
                len(splits[n]) / sizes[n],
            ),
        )
        splits[name].append(fact)
    return splits


@torch.inference_mode()
def general_nll(model, tokenizer, texts: Sequence[str] = GENERAL_TEXT) -> float:
    """Mean NLL per token of `texts` (exp of it: their perplexity)."""
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    device = next(model.parameters()).device
    ids = _padded(encoded, pad_id(tokenizer))
    mask = _padded([[1] * len(e) for e in encoded], 0)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()
    chosen = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    real = mask[:, 1:].bool()
    return float(-chosen[real].mean())


def chat_probes(model, tokenizer, max_new_tokens: int = 12) -> list[dict]:
    """Greedy chat answers to CHAT_PROBES, each marked ok when it contains an expected word."""
    answers = greedy_answers(
        model, tokenizer, [q for q, _ in CHAT_PROBES], max_new_tokens, chat_template=True
    )
    out = []
    for (question, words), answer in zip(CHAT_PROBES, answers, strict=True):
        said = answer.lower().replace(".", " ").replace(",", " ").split()
        out.append({"question": question, "answer": answer, "ok": any(w in said for w in words)})
    return out
