-- dbplan:no-transaction
VACUUM FULL orders;
