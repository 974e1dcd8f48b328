"""Built-in word lists for RULER needle keys ("adjective-noun", like RULER's wonderwords keys).

RULER draws keys from the `wonderwords` package lists; shipping our own lists keeps generation offline and
stable across package versions. Keys differ from RULER's, the recipe does not.
"""
from __future__ import annotations

ADJECTIVES = """
abundant acidic adorable aggressive alert ancient angry anxious appalling aquatic ashamed average awesome
bashful beautiful bewildered bitter bizarre bland blue-eyed boiling brave breezy brief bright broad bumpy
calm careful cheerful chilly clever cloudy clumsy colorful colossal cool courageous crazy creepy crowded
curious cute damaged damp dazzling dear decisive deep defiant delicious delightful dependent determined
different diligent dizzy drab dry dull dusty eager early educated elegant empty enchanting energetic
enormous envious equal excited fancy fantastic fast fearless fierce filthy flat fluffy foolish fragile
frail frantic fresh friendly frightened fuzzy gentle giant gifted gigantic glamorous gleaming gloomy
glorious graceful grumpy guarded handsome happy harsh healthy heavy helpful helpless hilarious hollow
homely honest hot huge humble hungry icy immense important impossible innocent itchy jealous jittery
jolly juicy kind knowing large lazy light little lively lonely long loud lovely lucky magnificent massive
mature melodic messy mighty misty modern muddy mushy mysterious narrow nasty naughty nervous noisy nutty
obedient odd old orange ordinary outrageous pale perfect plain pleasant polite powerful precious pretty
prickly proud puzzled quaint quick quiet rapid rare raspy real red rich righteous ripe roasted rough round
rustic salty scary scrawny selfish shaggy shallow sharp shiny short shy silent silky silly skinny sleepy
slimy slow small smooth soft sour sparkling spicy splendid spotless square steady steep sticky stormy
strange strong stupendous sturdy successful sweet swift tame tart tasty tender tense terrible thankful
thirsty thoughtful tidy tiny tired tough tricky ugly unusual upset vast verdant victorious vivacious
wandering warm wary wealthy weary wet whimsical wicked wide wild wise witty wonderful wooden worried young
zany zealous
""".split()

NOUNS = """
account airport alligator anchor ant apartment apple arch armchair attic avocado bakery balloon banana
barn basket battery beach beard bedroom bee bicycle blanket boat bonnet book bottle boulder bracelet bread
bridge broccoli brother bucket butter button cabin cactus camera canal candle canoe canyon carpet carrot
castle cat cathedral cattle celery cellar chair cheese cherry chimney church circus city clock closet cloud
coat coffee comet compass cookie corn cottage cousin cow crayon crow cucumber cupboard curtain daisy desert
desk dinosaur doctor dog dolphin donkey door dragon drawer drum eagle elbow elephant engine envelope eraser
falcon farm feather fence ferry field finger fireplace fish flag flute forest fountain fox frog garage
garden giraffe glacier glove goat grape guitar hammer harbor hat hedgehog helmet hill honey horse hospital
hotel island jacket jaguar jar kangaroo kettle key kitchen kite ladder lake lamp lantern lemon library
lighthouse lion lizard lobster locket magnet mango maple market meadow melon microwave mirror monkey
mountain mouse museum mushroom napkin necklace needle nest notebook ocean octopus office onion orchard
otter owl oyster paddle palace pancake panda parrot peach peacock pear pebble pencil penguin pepper piano
pillow pineapple planet plum pocket pond potato puppy pyramid quilt rabbit radio raft rainbow raven
ribbon river robot rocket rooster saddle sailboat salmon sandwich saxophone scarf school scooter shark
sheep shelf shoe shovel skyscraper sled snail snake sock sofa spider sponge spoon squirrel stadium
staircase starfish statue stove strawberry submarine suitcase sunflower swan sweater table teapot telescope
tent theater tiger toaster tomato tortoise tower tractor train trampoline tree truck trumpet tulip tunnel
turtle umbrella unicorn vase village violin volcano wagon wallet walrus wardrobe waterfall whale wheel
whistle window wolf yacht zebra
""".split()

KEY_WORDS: tuple[str, ...] = tuple(sorted({f"{adj}-{noun}" for adj in ADJECTIVES for noun in NOUNS}))
