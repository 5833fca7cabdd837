"""A small factual-recall task beyond the eight, in both schemas of README's "Your own task", from public facts:
the capitals of countries and of US states and the symbols of chemical elements.

    python examples/facts/make.py     # writes examples/facts/{recall,choice}/{train,test}.jsonl (committed)

recall: one target, {"prompt": "The capital of France is", "target": "Paris"} (scored after a space).
choice: the same prompt with the right answer and three others of the same relation, {"prompt", "choices",
"answer"}. A seeded 70/30 split of the facts into train and test, the same for both.
"""
import json
import random
from pathlib import Path

COUNTRIES = """Afghanistan:Kabul|Albania:Tirana|Algeria:Algiers|Andorra:Andorra la Vella|Angola:Luanda|Argentina:Buenos Aires
Armenia:Yerevan|Australia:Canberra|Austria:Vienna|Azerbaijan:Baku|the Bahamas:Nassau|Bahrain:Manama|Bangladesh:Dhaka
Barbados:Bridgetown|Belarus:Minsk|Belgium:Brussels|Belize:Belmopan|Benin:Porto-Novo|Bhutan:Thimphu
Bosnia and Herzegovina:Sarajevo|Botswana:Gaborone|Brazil:Brasília|Brunei:Bandar Seri Begawan|Bulgaria:Sofia
Burkina Faso:Ouagadougou|Cambodia:Phnom Penh|Cameroon:Yaoundé|Canada:Ottawa|Cape Verde:Praia
the Central African Republic:Bangui|Chad:N'Djamena|Chile:Santiago|China:Beijing|Colombia:Bogotá|the Comoros:Moroni
Costa Rica:San José|Croatia:Zagreb|Cuba:Havana|Cyprus:Nicosia|the Czech Republic:Prague
the Democratic Republic of the Congo:Kinshasa|Denmark:Copenhagen|Dominica:Roseau|the Dominican Republic:Santo Domingo
Ecuador:Quito|Egypt:Cairo|El Salvador:San Salvador|Equatorial Guinea:Malabo|Eritrea:Asmara|Estonia:Tallinn
Ethiopia:Addis Ababa|Fiji:Suva|Finland:Helsinki|France:Paris|Gabon:Libreville|the Gambia:Banjul|Germany:Berlin
Ghana:Accra|Greece:Athens|Guatemala:Guatemala City|Guinea:Conakry|Guinea-Bissau:Bissau|Guyana:Georgetown
Haiti:Port-au-Prince|Honduras:Tegucigalpa|Hungary:Budapest|Iceland:Reykjavik|India:New Delhi|Iran:Tehran|Iraq:Baghdad
Ireland:Dublin|Italy:Rome|Jamaica:Kingston|Japan:Tokyo|Jordan:Amman|Kazakhstan:Astana|Kenya:Nairobi|Kuwait:Kuwait City
Kyrgyzstan:Bishkek|Laos:Vientiane|Latvia:Riga|Lebanon:Beirut|Lesotho:Maseru|Liberia:Monrovia|Libya:Tripoli
Liechtenstein:Vaduz|Lithuania:Vilnius|Madagascar:Antananarivo|Malawi:Lilongwe|Malaysia:Kuala Lumpur|the Maldives:Malé
Mali:Bamako|Malta:Valletta|the Marshall Islands:Majuro|Mauritania:Nouakchott|Mauritius:Port Louis|Mexico:Mexico City
Micronesia:Palikir|Moldova:Chișinău|Mongolia:Ulaanbaatar|Montenegro:Podgorica|Morocco:Rabat|Mozambique:Maputo
Myanmar:Naypyidaw|Namibia:Windhoek|Nepal:Kathmandu|the Netherlands:Amsterdam|New Zealand:Wellington|Nicaragua:Managua
Niger:Niamey|Nigeria:Abuja|North Korea:Pyongyang|North Macedonia:Skopje|Norway:Oslo|Oman:Muscat|Pakistan:Islamabad
Palau:Ngerulmud|Panama:Panama City|Papua New Guinea:Port Moresby|Paraguay:Asunción|Peru:Lima|the Philippines:Manila
Poland:Warsaw|Portugal:Lisbon|Qatar:Doha|the Republic of the Congo:Brazzaville|Romania:Bucharest|Russia:Moscow
Rwanda:Kigali|Saint Kitts and Nevis:Basseterre|Saint Lucia:Castries|Saint Vincent and the Grenadines:Kingstown
Samoa:Apia|Saudi Arabia:Riyadh|Senegal:Dakar|Serbia:Belgrade|the Seychelles:Victoria|Sierra Leone:Freetown
Slovakia:Bratislava|Slovenia:Ljubljana|the Solomon Islands:Honiara|Somalia:Mogadishu|South Korea:Seoul|South Sudan:Juba
Spain:Madrid|Sudan:Khartoum|Suriname:Paramaribo|Sweden:Stockholm|Switzerland:Bern|Syria:Damascus|Tajikistan:Dushanbe
Tanzania:Dodoma|Thailand:Bangkok|Timor-Leste:Dili|Togo:Lomé|Trinidad and Tobago:Port of Spain|Tunisia:Tunis
Turkey:Ankara|Turkmenistan:Ashgabat|Tuvalu:Funafuti|Uganda:Kampala|Ukraine:Kyiv|the United Arab Emirates:Abu Dhabi
the United Kingdom:London|Uruguay:Montevideo|Uzbekistan:Tashkent|Vanuatu:Port Vila|Venezuela:Caracas|Vietnam:Hanoi
Zambia:Lusaka|Zimbabwe:Harare"""

STATES = """Alabama:Montgomery|Alaska:Juneau|Arizona:Phoenix|Arkansas:Little Rock|California:Sacramento|Colorado:Denver
Connecticut:Hartford|Delaware:Dover|Florida:Tallahassee|Georgia:Atlanta|Hawaii:Honolulu|Idaho:Boise|Illinois:Springfield
Indiana:Indianapolis|Iowa:Des Moines|Kansas:Topeka|Kentucky:Frankfort|Louisiana:Baton Rouge|Maine:Augusta
Maryland:Annapolis|Massachusetts:Boston|Michigan:Lansing|Minnesota:Saint Paul|Mississippi:Jackson
Missouri:Jefferson City|Montana:Helena|Nebraska:Lincoln|Nevada:Carson City|New Hampshire:Concord|New Jersey:Trenton
New Mexico:Santa Fe|New York:Albany|North Carolina:Raleigh|North Dakota:Bismarck|Ohio:Columbus
Oklahoma:Oklahoma City|Oregon:Salem|Pennsylvania:Harrisburg|Rhode Island:Providence|South Carolina:Columbia
South Dakota:Pierre|Tennessee:Nashville|Texas:Austin|Utah:Salt Lake City|Vermont:Montpelier|Virginia:Richmond
Washington:Olympia|West Virginia:Charleston|Wisconsin:Madison|Wyoming:Cheyenne"""

ELEMENTS = """hydrogen:H|helium:He|lithium:Li|beryllium:Be|boron:B|carbon:C|nitrogen:N|oxygen:O|fluorine:F|neon:Ne|sodium:Na
magnesium:Mg|aluminium:Al|silicon:Si|phosphorus:P|sulfur:S|chlorine:Cl|argon:Ar|potassium:K|calcium:Ca|scandium:Sc
titanium:Ti|vanadium:V|chromium:Cr|manganese:Mn|iron:Fe|cobalt:Co|nickel:Ni|copper:Cu|zinc:Zn|gallium:Ga|germanium:Ge
arsenic:As|selenium:Se|bromine:Br|krypton:Kr|rubidium:Rb|strontium:Sr|yttrium:Y|zirconium:Zr|niobium:Nb
molybdenum:Mo|technetium:Tc|ruthenium:Ru|rhodium:Rh|palladium:Pd|silver:Ag|cadmium:Cd|indium:In|tin:Sn|antimony:Sb
tellurium:Te|iodine:I|xenon:Xe|caesium:Cs|barium:Ba|lanthanum:La|cerium:Ce|neodymium:Nd|europium:Eu|gadolinium:Gd
hafnium:Hf|tantalum:Ta|tungsten:W|rhenium:Re|osmium:Os|iridium:Ir|platinum:Pt|gold:Au|mercury:Hg|thallium:Tl|lead:Pb
bismuth:Bi|polonium:Po|radon:Rn|francium:Fr|radium:Ra|thorium:Th|uranium:U|plutonium:Pu"""

RELATIONS = {"The capital of {} is": COUNTRIES, "The capital of the US state of {} is": STATES,
             "The chemical symbol of {} is": ELEMENTS}


def facts() -> list[tuple[str, str, list[str]]]:
    """(prompt, answer, the other answers of its relation)."""
    out = []
    for template, table in RELATIONS.items():
        pairs = [item.split(":") for item in table.replace("\n", "|").split("|")]
        answers = [a for _, a in pairs]
        out += [(template.format(subject), answer, [a for a in answers if a != answer]) for subject, answer in pairs]
    return out


def main() -> None:
    rng = random.Random(0)
    rows = facts()
    rng.shuffle(rows)
    test_size = round(0.3 * len(rows))
    root = Path(__file__).resolve().parent
    for split, part in (("test", rows[:test_size]), ("train", rows[test_size:])):
        recall = [{"prompt": prompt, "target": answer} for prompt, answer, _ in part]
        choice = []
        for prompt, answer, others in part:
            choices = rng.sample(others, 3) + [answer]
            rng.shuffle(choices)
            choice.append({"prompt": prompt, "choices": choices, "answer": choices.index(answer)})
        for kind, records in (("recall", recall), ("choice", choice)):
            (root / kind).mkdir(exist_ok=True)
            with open(root / kind / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    print(f"{len(rows)} facts: {len(rows) - test_size} train, {test_size} test, in {root}/recall and {root}/choice")


if __name__ == "__main__":
    main()
